"""`droppos shard`: an ImageNet-style folder, list files or image + label-map layouts -> validated shards.

DALI has no per-sample skip and its shuffle is only a local buffer, so this stage decodes and
validates every input, converts what DALI and Pillow could disagree on, skips and reports what
cannot be decoded (written + skipped = found), shuffles globally, and writes each shard with its
DALI index and then `manifest.json` (the dataset contract of droppos.manifest). Its modules:
`inputs` (reading one file safely), `discover` (what SOURCE holds), `convert` (one image or label
map), `writer` (shards, workers, resume, manifest), `command` (`run`), `verifier` (`--verify`);
the tar + index format is droppos.tarindex. Nothing here imports torch.
"""

from droppos.shard.command import run
from droppos.shard.verifier import verify

__all__ = ["run", "verify"]
