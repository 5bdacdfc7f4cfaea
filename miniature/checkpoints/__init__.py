"""The `tiny://` checkpoint scheme: tiny checkpoints for the tests and the embedded default, in the same layouts
as the real ones.

`tiny://vlm` (a Qwen2.5-VL whose language model has learned the world's captions before it is frozen,
miniature.checkpoints.world_language) and `tiny://dino` (a random DINOv2 with registers) are what the tiny preset
names; they are loaded through exactly the code that loads real checkpoints (`from_pretrained` on a directory), so
nothing reaches a model hub; each is built once per machine under <cache>/tiny/ on first use (seconds), and
processes that ask at the same time wait for the first. `tiny://trellis` is a TRELLIS release trained on the
synthetic world (miniature.checkpoints.trained_trellis): its training takes longer than a CI run allows, so the
release is shipped in this package. The scheme reaches gap3d.checkpoints.resolve through the entry point this
package registers (pyproject.toml), so the library never imports it.
`miniature.checkpoints.trellis` writes tiny random TRELLIS checkpoints in the release layout, for tests.
"""

import logging
import shutil
import tempfile
from pathlib import Path

from gap3d import storage
from miniature.checkpoints.encoders import write_tiny_dino
from miniature.checkpoints.metric_extractors import write_random_inception, write_tiny_clip
from miniature.checkpoints.trained_trellis import SHIPPED_RELEASE
from miniature.checkpoints.world_language import write_world_vlm

logger = logging.getLogger(__name__)

# Bump a builder's version when it changes what it writes, so caches built by older code are not reused. The shipped
# tiny://trellis records the fingerprint of the tiny://dino it was trained on (tests/test_trained_trellis.py checks it).
BUILDERS = {
    "vlm": (write_world_vlm, "4"),
    "dino": (write_tiny_dino, "3"),
    "clip": (write_tiny_clip, "2"),  # Table 3's extractors (miniature.checkpoints.metric_extractors)
    "inception": (write_random_inception, "1"),
}
SHIPPED = {"trellis": SHIPPED_RELEASE}
_COMPLETE = ".complete"


def tiny_checkpoint(name: str) -> Path:
    """The directory of tiny checkpoint `name` ("vlm", "dino", "trellis", ...): shipped, or built on first use."""
    if name in SHIPPED:
        return _shipped(name)
    target = _cache_dir(name)
    builder = BUILDERS[name][0]
    with storage.cache_lock(target):
        if not (target / _COMPLETE).is_file():
            logger.info("building tiny checkpoint tiny://%s in %s", name, target)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f"{target.name}.partial-"))
            try:
                builder(staging)
                (staging / _COMPLETE).touch()
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _shipped(name: str) -> Path:
    release = SHIPPED[name]
    if not (release / "pipeline.json").is_file():
        raise FileNotFoundError(
            f"tiny://{name} is not in this checkout ({release}); rebuild it with "
            f"`python -m cli make-tiny --trained --out {release}`"
        )
    return release


def _cache_dir(name: str) -> Path:
    if name not in BUILDERS:
        known = ", ".join(f"tiny://{n}" for n in (*BUILDERS, *SHIPPED))
        raise ValueError(f"unknown tiny checkpoint tiny://{name}; there are {known}")
    return storage.cache_root() / "tiny" / f"{name}-v{BUILDERS[name][1]}"
