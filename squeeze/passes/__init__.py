"""The passes: prepare → compress → evaluate → write → report; quantize, prune, distill and eval
differ only in their own step."""
