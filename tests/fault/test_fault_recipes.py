"""Recipe files under faults (issue #18, defects 2 and 10): aliases of aliases and deep nesting are
one line naming file and line, in well under a second, and no YAML a fuzzer writes (aliases, tags,
bad bytes, tabs) gets past the recipe parser as anything but a recipe or one line per problem."""

import contextlib
import signal
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from squeeze.cli import app
from squeeze.recipes import STAGE_TYPES, Recipe, RecipeError, load_recipe
from squeeze.safe_yaml import MAX_DEPTH, MAX_VALUES, TooLarge, read_yaml

runner = CliRunner()
SECONDS = 5  # far above what any of these takes; a hang or an alias expanded is far above it


class Hang(Exception):
    """An example ran past SECONDS."""


@contextlib.contextmanager
def bounded(seconds: float = SECONDS):
    """Raise Hang in the test if the body runs longer than ``seconds``."""
    def stop(signum, frame):
        raise Hang(f"still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def write(folder: Path, text: str | bytes, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def outcome(path: Path) -> Recipe | RecipeError:
    """The recipe, or its error; anything else (a traceback, a hang) fails the test. Every problem
    is one line that names the file."""
    try:
        with bounded():
            return load_recipe(path)
    except RecipeError as exc:
        assert exc.problems and all("\n" not in p and p.startswith(f"{path}:") for p in exc.problems), exc.problems
        assert len(exc.problems) > 1 or "\n" not in str(exc)
        return exc


def one_problem(path: Path) -> str:
    found = outcome(path)
    assert isinstance(found, RecipeError) and len(found.problems) == 1, found
    return found.problems[0]


def nine_stage_bomb() -> str:
    """Nine stages, each one's targets nine aliases of the one before: 9**8 names when expanded."""
    stages = ["stages:", "  - quantize: {targets: &t0 [lm_head]}"]
    stages += [f"  - quantize: {{targets: &t{i} [{', '.join([f'*t{i - 1}'] * 9)}]}}" for i in range(1, 9)]
    return "\n".join(stages) + "\n"


def merge_bomb() -> str:
    """Merge keys (``<<``) of aliases: 9**9 pairs where PyYAML copies every merged pair (6.0.4 drops
    repeats, not every release pyyaml>=6 allows does); each merged alias counts, expanded, either way."""
    lines = ["stages:", "  - quantize: &m0 {bits: 4}"]
    lines += [f"  - quantize: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 9)}]}}" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text", [nine_stage_bomb(), merge_bomb()], ids=["aliases", "merge-keys"])
def test_alias_bomb_is_one_line_in_well_under_a_second(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    start = time.monotonic()
    problem = one_problem(path)
    assert time.monotonic() - start < 1.0
    assert f"more than {MAX_VALUES:,} values" in problem and "aliases" in problem
    line = int(problem.split(":")[1])
    assert 2 <= line <= len(text.splitlines())


def test_alias_bomb_through_the_cli_is_exit_2_and_leaves_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, nine_stage_bomb())
    out = tmp_path / "out"
    with bounded():
        result = runner.invoke(app, ["run", str(path), "--model", "no-such-model", "--dry-run", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output
    assert f"{path}:" in result.output and "aliases" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_aliases_within_the_limits_still_work_and_point_at_their_use(tmp_path: Path) -> None:
    shared = write(tmp_path, "stages:\n  - prune: {targets: &t [q_proj, k_proj]}\n  - quantize: {targets: *t, bits: 4}\n")
    recipe = outcome(shared)
    assert isinstance(recipe, Recipe) and recipe.stages[0].targets == recipe.stages[1].targets == ("q_proj", "k_proj")
    broken = write(tmp_path, "stages:\n  - prune: &p {method: wanda, sparsty: 0.5}\n  - prune: *p\n", "broken.yaml")
    found = outcome(broken)
    assert isinstance(found, RecipeError) and len(found.problems) == 2
    # the first stage's mistake is on its own line; the second stage is the alias, on line 3
    assert found.problems[0].startswith(f"{broken}:2:") and found.problems[1].startswith(f"{broken}:3:")
    assert all("'sparsty'" in p for p in found.problems)


def test_the_value_limit_counts_what_aliases_expand_to() -> None:
    # k aliases of a list of n names: k * (n + 1) + 1 values, plus the mapping around them
    def aliases(n: int, k: int) -> str:
        return f"a: &x [{', '.join(['n'] * n)}]\nb: [{', '.join(['*x'] * k)}]\n"
    under, _ = read_yaml(aliases(999, 90))  # about 90,000 values
    assert len(under["b"]) == 90 and under["b"][0] is under["a"]  # shared, as the safe loader builds it
    with pytest.raises(TooLarge, match="values"):
        read_yaml(aliases(999, 110))  # about 110,000


@pytest.mark.parametrize("kind", ["list", "mapping", "aliases"])
def test_nesting_stops_at_the_limit(kind: str) -> None:
    def nested(levels: int) -> str:  # a document ``levels`` deep, counting the scalar at the bottom
        if kind == "list":
            return "[" * (levels - 1) + "x" + "]" * (levels - 1)
        if kind == "mapping":
            return "{a: " * (levels - 1) + "x" + "}" * (levels - 1)
        # written two levels deep, but each alias holds the one before: ``levels`` deep when built
        chain = ["a1: &a1 [x]"] + [f"a{i}: &a{i} [*a{i - 1}]" for i in range(2, levels - 1)]
        return "\n".join(chain) + "\n"
    data, _ = read_yaml(nested(MAX_DEPTH))
    assert data is not None
    with pytest.raises(TooLarge, match=f"nested more than {MAX_DEPTH} levels"):
        read_yaml(nested(MAX_DEPTH + 1))


def test_an_alias_inside_itself_is_refused() -> None:
    with pytest.raises(TooLarge, match="nested"):
        read_yaml("a: &x [1, *x]\n")


@pytest.mark.parametrize("value", ["[" * 1000 + "]" * 1000, "{a: " * 1000 + "1" + "}" * 1000])
def test_thousand_levels_deep_is_one_line_with_its_line(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, f"name: deep\nstages:\n  - quantize:\n      targets: {value}\n")
    problem = one_problem(path)
    assert problem.startswith(f"{path}:4: ") and f"nested more than {MAX_DEPTH} levels deep" in problem
    with bounded():
        result = runner.invoke(app, ["run", str(path), "--model", "no-such-model", "--dry-run"])
    assert result.exit_code == 2 and result.output.count("error:") == 1 and "Traceback" not in result.output


@given(levels=st.integers(1, 3 * MAX_DEPTH), shape=st.lists(st.booleans(), min_size=3 * MAX_DEPTH, max_size=3 * MAX_DEPTH))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_an_option_nested_at_any_depth(tmp_path: Path, levels: int, shape: list[bool]) -> None:
    opening = "".join("[" if is_list else "{a: " for is_list in shape[:levels])
    closing = "".join("]" if is_list else "}" for is_list in reversed(shape[:levels]))
    path = write(tmp_path, f"stages:\n  - quantize: {{targets: {opening}x{closing}}}\n")
    found = outcome(path)
    # the document, stages, the stage, its options: the targets value is the fifth level
    if 5 + levels > MAX_DEPTH:
        assert isinstance(found, RecipeError) and found.problems == [f"{path}:2: nested more than {MAX_DEPTH} levels deep"]
    elif levels == 1 and shape[0]:
        assert isinstance(found, Recipe) and found.stages[0].targets == ("x",)
    else:
        assert isinstance(found, RecipeError) and all(p.startswith(f"{path}:2: ") and "targets" in p for p in found.problems)


@pytest.mark.parametrize(("text", "line", "words"), [
    ("stages:\n  - quantize:\n      bits: !!int abc\n", 3, "'abc' is not a valid int"),
    ("stages:\n  - quantize:\n      bits: " + "9" * 5000 + "\n", 3, "is not a valid int"),
    ("name: x\nstages:\n  - distill:\n      seed: 2001-13-01\n", 4, "'2001-13-01' is not a valid timestamp"),
    ("stages:\n  - quantize:\n      act_asym: !!bool maybe\n", 3, "'maybe' is not a valid bool"),
    ("stages:\n  - quantize:\n      bits: !!timestamp soon\n", 3, "'soon' is not a valid timestamp"),
    ("stages:\n  - quantize:\n      bits: !!float .\n", 3, "'.' is not a valid float"),
    ("stages:\n  - quantize:\n\tbits: 4\n", 3, "not valid YAML"),
    ("stages:\n  - quantize:\n      bits: 4\x00\n", 3, "character #x0000 is not allowed"),
])
def test_scalars_and_characters_yaml_cannot_read_are_one_line(tmp_path: Path, text: str, line: int, words: str) -> None:
    problem = one_problem(write(tmp_path, text))
    assert problem.startswith(f"{tmp_path / 'recipe.yaml'}:{line}: ") and words in problem, problem


def test_bytes_that_are_not_utf8_are_one_line_with_their_line(tmp_path: Path) -> None:
    path = write(tmp_path, b"name: x\nstages:\n  - prune: {method: \xff\xfe}\n")
    assert one_problem(path).startswith(f"{path}:3: not UTF-8 text (byte 0xff)")


def test_python_tags_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    for tag in ("!!python/object/apply:os.system", "!!python/object/apply:subprocess.call"):
        path = write(tmp_path, f"stages:\n  - quantize:\n      bits: {tag} [['touch', '{marker}']]\n")
        assert "could not determine a constructor" in one_problem(path)
    path = write(tmp_path, f"stages:\n  - quantize: !!python/object/new:pathlib.Path ['{marker}']\n")
    assert "could not determine a constructor" in one_problem(path)
    assert not marker.exists()


def test_option_names_that_are_not_text_are_unknown_options(tmp_path: Path) -> None:
    path = write(tmp_path, "stages:\n  - quantize: {1: 2, ~: 3, bits: 4}\n")
    found = outcome(path)
    assert isinstance(found, RecipeError) and len(found.problems) == 2
    assert all("unknown option" in p and p.startswith(f"{path}:2:") for p in found.problems)


def test_long_values_are_cut_short_in_messages(tmp_path: Path) -> None:
    path = write(tmp_path, f"stages:\n  - quantize: {{bits: {'x' * 10000}, targets: [{', '.join(['[a]'] * 1000)}]}}\n")
    found = outcome(path)
    assert isinstance(found, RecipeError) and all(len(p) < 400 for p in found.problems), found.problems


# The fuzzer: YAML written from random trees of lists, mappings and scalars, with anchors, aliases
# (to anchors before them, around them, or to none) and tags; stages mostly of real option names
# with plausible values, so that some recipes parse and the stage models see odd values too.

OPTIONS = {name: sorted(cls.model_fields) for name, cls in STAGE_TYPES.items()}
GOOD = ["4", "8", "64", "128", "0.5", "2e6", "true", "false", "~", "gptq", "rtn", "awq", "wanda", "magnitude",
        "'2:4'", "per-group", "per-channel", "[q_proj, k_proj]", "'layers:2'", "original", "previous", "5GB", "wikipedia"]
NASTY = ["0", "-1", "1e999", ".nan", "2001-13-01", "2024-01-01", "9" * 5000, '"esc\\nape"', '"\\x00"', "!!int x",
         "!!binary aGk=", "!!python/object/apply:os.system ['true']", "!!python/name:os.system", "!custom x",
         "&", "*", "|", "@", "'", "", "?", "-", "a b", "<<", "stages", "name", "bits"]
TAGS = ["", "", "", "", "", "", "!!set ", "!!omap ", "!!pairs ", "!!map ", "!!seq ", "!!python/tuple ", "!local "]


def scalar(good: int) -> st.SearchStrategy:
    """A scalar node, a good value ``good`` times as often as a nasty one."""
    return st.tuples(st.just("scalar"), st.one_of(*[st.sampled_from(GOOD)] * good, st.sampled_from(NASTY)))


def branch(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.one_of(
        st.tuples(st.just("list"), st.lists(children, max_size=5), st.booleans(), st.sampled_from(TAGS)),
        st.tuples(st.just("map"), st.lists(st.tuples(st.one_of(scalar(1), children), children), max_size=5),
                  st.booleans(), st.sampled_from(TAGS)),
    )


TREE = st.recursive(st.one_of(scalar(3), scalar(3), st.tuples(st.just("alias"), st.integers(0, 20))), branch, max_leaves=30)
VALUES = st.one_of(scalar(6), TREE)


def options(name: str) -> st.SearchStrategy:
    """The options of pass ``name``: mostly its own option names with good values, now and then anything."""
    keys = st.tuples(st.just("scalar"), st.sampled_from(OPTIONS.get(name, ["method"])))
    mapping = st.tuples(st.just("map"), st.lists(st.tuples(st.one_of(keys, keys, keys, scalar(1)), VALUES), max_size=4), st.booleans(), st.just(""))
    return st.tuples(st.just(name), st.one_of(mapping, mapping, TREE))


STAGE = st.one_of(*[options(name) for name in [*STAGE_TYPES, "quantise"]])


def render(node, anchors: list[str]) -> str:
    """``node`` as flow-style YAML; an anchor is named before its contents are written, so an alias
    inside them refers to the node around it."""
    kind = node[0]
    if kind == "scalar":
        return node[1]
    if kind == "alias":
        return f"*{anchors[node[1] % len(anchors)]}" if anchors else "*nowhere"
    head = node[3]
    if node[2]:
        anchors.append(f"a{len(anchors)}")
        head += f"&{anchors[-1]} "
    if kind == "list":
        return head + "[" + ", ".join(render(child, anchors) for child in node[1]) + "]"
    return head + "{" + ", ".join(f"{render(key, anchors)}: {render(value, anchors)}" for key, value in node[1]) + "}"


def recipe_text(extra, stages, extra_key: str) -> str:
    anchors: list[str] = []
    text = f"name: fuzz\nseq_len: 32\n{extra_key}: {render(extra, anchors)}\n" if extra_key else "name: fuzz\n"
    return text + "stages:\n" + "".join(f"  - {{{name}: {render(options, anchors)}}}\n" for name, options in stages)


stages = st.lists(STAGE, min_size=1, max_size=4)
extra_keys = st.sampled_from(["", "", "description", "data", "max_shard_size", "extra"])
pieces = [b"\t", b"\xff", b"\x00", b"\n", b"  ", b"&b ", b"*b", b"{", b"]", b"#", b":", b"\r", b"\xef\xbb\xbf"]
edits = st.one_of(st.just([]), st.just([]), st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(pieces)), min_size=1, max_size=3))


def mutate(text: str, edits) -> bytes:
    raw = text.encode()
    for position, piece in edits:
        at = position % (len(raw) + 1)
        raw = raw[:at] + piece + raw[at:]
    return raw


@given(extra=TREE, stages=stages, extra_key=extra_keys, edits=edits)
@settings(max_examples=200, deadline=None)
def test_fuzzed_recipes_parse_or_fail_in_one_line_per_problem(extra, stages, extra_key: str, edits) -> None:
    with tempfile.TemporaryDirectory() as folder:
        outcome(write(Path(folder), mutate(recipe_text(extra, stages, extra_key), edits)))


@given(raw=st.binary(max_size=400))
@settings(max_examples=60, deadline=None)
def test_random_bytes_parse_or_fail_in_one_line_per_problem(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        outcome(write(Path(folder), raw))


@given(extra=TREE, stages=stages, extra_key=extra_keys, edits=edits)
@settings(max_examples=8, deadline=None)
def test_fuzzed_recipes_through_the_cli_are_a_plan_or_exit_2(tiny_llama_dir: Path, extra, stages, extra_key: str, edits) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), mutate(recipe_text(extra, stages, extra_key), edits))
        out = Path(folder) / "out"
        with bounded(30):
            result = runner.invoke(app, ["run", str(path), "--model", str(tiny_llama_dir), "--dry-run", "--out", str(out)])
        assert result.exit_code in (0, 2), (result.output, result.exception)
        assert "Traceback" not in result.output and not out.exists()
        assert result.output.count("error:") == (result.exit_code == 2)
