"""Shared pytest setup: offline hub, few CPU threads, and tiny saved models.

The fixtures below save a tiny random-weight model once per test session (see ``diffusion_pref.testing``) and
return its folder as a ``pathlib.Path``. The folders are shared by every test: load from them, never write
into them (copy with ``shutil.copytree`` first if a test must modify one).

- ``tiny_sd_dir``: ``save_tiny_sd`` (SD1.x layout, epsilon prediction, seed 0)
- ``tiny_sd_vpred_dir``: ``save_tiny_sd(prediction_type="v_prediction")``
- ``tiny_sdxl_dir``: ``save_tiny_sdxl`` (SDXL layout)
- ``tiny_tango_dir``: ``save_tiny_tango`` (AudioLDM-style subfolders + ``stft_config.json``)
- ``tiny_causal_lm_dir``: ``save_tiny_causal_lm`` (GPT-2 model + tokenizer)
"""

import os

# Set before any test imports huggingface_hub / transformers, which read these once at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The CI and development machines are small; more threads than cores only adds contention. A thread count given
# in the environment is kept, so the suite can be checked with the reductions split other ways (1, 2, ... threads).
if not (os.environ.get("OMP_NUM_THREADS") or os.environ.get("MKL_NUM_THREADS")):
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from diffusion_pref.testing import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd_vpred_dir(tmp_path_factory):
    from diffusion_pref.testing import save_tiny_sd

    return save_tiny_sd(tmp_path_factory.mktemp("tiny-sd-vpred"), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from diffusion_pref.testing import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A tiny SD3 (flow matching) without its optional T5 encoder."""
    from diffusion_pref.testing import save_tiny_sd3

    return save_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3-no-t5"), t5=False)


@pytest.fixture(scope="session")
def tiny_tango_dir(tmp_path_factory):
    from diffusion_pref.testing import save_tiny_tango

    return save_tiny_tango(tmp_path_factory.mktemp("tiny-tango"))


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(tmp_path_factory):
    from diffusion_pref.testing import save_tiny_causal_lm

    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny-causal-lm"))
