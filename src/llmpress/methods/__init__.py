"""Built-in methods; importing this package registers them (see llmpress.config.register)."""
from llmpress.methods import rtn, magnitude, lowrank, gptq, sparsegpt, wanda, awq, qlr, oats, lut, vq, series, parse  # noqa: F401,E501
