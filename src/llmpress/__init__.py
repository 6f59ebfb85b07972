"""llmpress: compress Hugging Face causal LMs after training.

Quantization, pruning and low-rank factorization behind one block-by-block pipeline, driven by a
Plan (plain data: pattern -> method config). Importing this package loads no model, touches no GPU
and imports no evaluation harness.
"""
from llmpress.errors import LLMPressError
from llmpress.config import MethodConfig, config_from_dict
from llmpress.plan import Plan
from llmpress.recipe import Recipe
from llmpress import methods as _methods  # registers the built-in methods  # noqa: F401
from llmpress.methods.rtn import RTN
from llmpress.methods.magnitude import Magnitude
from llmpress.methods.lowrank import SVD, ASVD, SVDLLM
from llmpress.methods.gptq import GPTQ
from llmpress.methods.awq import AWQ
from llmpress.methods.sparsegpt import SparseGPT
from llmpress.methods.wanda import Wanda
from llmpress.methods.qlr import ApiQ, GPTQLowRank
from llmpress.methods.lut import GPTQLUT
from llmpress.methods.vq import GPTQVQ
from llmpress.methods.oats import OATS
from llmpress.methods.series import Series

__version__ = "0.1.0"
__all__ = ["LLMPressError", "MethodConfig", "config_from_dict", "Plan", "Recipe", "RTN", "GPTQ", "AWQ", "Magnitude", "Wanda",
           "SparseGPT", "SVD", "ASVD", "SVDLLM", "GPTQLowRank", "ApiQ", "GPTQLUT", "GPTQVQ", "OATS", "Series"]
