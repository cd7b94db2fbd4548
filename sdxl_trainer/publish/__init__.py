"""Publishing a trained checkpoint: the folder (:mod:`.folder`), its model card (:mod:`.card`) and the
Hub upload (:mod:`.hub`). docs/publishing.md."""

from __future__ import annotations

from pathlib import Path

from sdxl_trainer import console
from sdxl_trainer.errors import UserError
from sdxl_trainer.publish.card import REPO_ID


def run(source: Path, *, repo_id: str | None, private: bool = False, what: str = "auto", upload: bool = True):
    """Assemble RUN/publish/ from a run or checkpoint and (with ``upload``) push it to ``repo_id``."""
    from sdxl_trainer.publish import folder, hub

    if upload and not repo_id:
        raise UserError("no repository given", fix="pass --repo-id USER/NAME, or --no-upload to assemble only")
    if repo_id and not REPO_ID.match(repo_id):
        raise UserError(f"{repo_id!r} is not a Hub repository id", fix="use USER/NAME (or ORG/NAME)")
    name = repo_id.split("/")[1] if repo_id else Path(source).expanduser().resolve().name
    pub = folder.assemble(Path(source), name=name, what=what)
    console.info(f"publish folder: {pub.folder} ({', '.join(pub.parts)}; {len(pub.files)} files, "
                 f"{len(pub.samples)} sample images, README.md model card)")  # fmt: skip
    if upload:
        url = hub.upload(pub.folder, repo_id, private=private, message=f"{name}: {pub.checkpoint.name}")
        console.info(f"published: {url}")
    return pub
