"""sdxl-trainer: fine-tune Stable Diffusion XL with the NovelAI V3 recipe and rectified flow.

Stages (each reads the previous stage's artifact): prep scan → prep stats → prep cache →
prep weights → train → evaluate. See README.md and docs/.
"""

__version__ = "0.1.0"
