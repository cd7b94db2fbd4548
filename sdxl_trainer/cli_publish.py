"""``sdxl publish``: a run or checkpoint → RUN/publish/ (model card included) → a Hub repository.
Registered on cli.py's app by :func:`register`, like cli_inference.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import typer

from sdxl_trainer import cli_help


def register(app: typer.Typer, user_errors: Callable[..., Any]) -> Callable[..., Any]:
    @app.command("publish", cls=cli_help.HelpCommand)
    @user_errors
    def publish(
        source: Path = typer.Argument(..., help="A run folder (its latest checkpoint) or RUN/checkpoints/step-N."),
        repo_id: Optional[str] = typer.Option(None, "--repo-id", "--hub-model-id", "--hub_model_id",
                                              help="Hub repository USER/NAME."),
        private: bool = typer.Option(False, "--private", "--hub-private", "--hub_private", help="A private repository."),
        what: str = typer.Option("auto", help="auto | full | lora | both: which exports to publish."),
        upload: bool = typer.Option(True, "--upload/--no-upload", help="Upload, or only assemble RUN/publish/."),
    ) -> None:
        """Assemble RUN/publish/ (model, workflow, samples, model card) and upload it to the Hub."""
        from sdxl_trainer import publish as stage

        stage.run(source, repo_id=repo_id, private=private, what=what, upload=upload)

    return publish
