"""The command lines and the tools that need both frameworks (the top layer).

`jaxvlm` (cli.main: train, eval, synthetic, generate, bench) and `python -m conversion`
(cli.convert: to-jax, to-torch, check, init, from-hf). Nothing below this package imports it.
"""
