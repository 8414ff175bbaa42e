"""`/api/v1/models`: the model registry over HTTP.

Reads need the read or admin token once auth is on (radai.api.auth); writes (upload, activate, shadow,
remove) need `Authorization: Bearer <api.admin_token>` and are refused outright while none is configured.
An upload is a multipart form with the package archive (.zip or .tar.gz) in the field `package`; it goes
through the same checks as `radai models add` (safe extraction, nothing that unpickles, card schema,
checksum, ONNX graph against the card, reference inference) and is refused with the reason (400), or with
413 when larger than `models.max_upload_bytes`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Protocol

from fastapi import APIRouter, Depends, File, HTTPException, Request, UploadFile
from pydantic import BaseModel

from radai.api.auth import Tokens, require_admin, require_read
from radai.errors import ModelPackageError, NotFoundError, RadaiError

ModelView = dict[str, Any]


class ModelAdmin(Protocol):
    """What the API needs of the registry and the running server (implemented in radai.app)."""

    max_upload_bytes: int

    def views(self) -> list[ModelView]: ...

    def add_archive(self, archive: Path, workdir: Path) -> tuple[ModelView, bool]: ...

    def activate(self, ref: str) -> ModelView: ...

    def set_shadow(self, model_id: str, version: str | None) -> ModelView | None: ...

    def remove(self, ref: str) -> list[str]: ...


class VersionBody(BaseModel):
    version: str


class ShadowBody(BaseModel):
    version: str | None = None  # null stops the shadow run


def _fail(exc: RadaiError) -> HTTPException:
    status = 404 if isinstance(exc, NotFoundError) else 400
    return HTTPException(status_code=status, detail=str(exc))


def models_router(admin: ModelAdmin, tokens: Tokens) -> APIRouter:
    router = APIRouter(prefix="/api/v1/models", tags=["models"], dependencies=[Depends(require_read(tokens))])
    write = [Depends(require_admin(tokens))]

    @router.get("")
    def list_models() -> list[ModelView]:
        """Every registered version: card summary, where it comes from, active / shadow, jobs holding it."""
        return admin.views()

    @router.get("/{model_id}")
    def get_model(model_id: str) -> list[ModelView]:
        """The versions of one model."""
        found = [v for v in admin.views() if v["id"] == model_id]
        if not found:
            raise HTTPException(404, f"no model {model_id!r} is registered")
        return found

    @router.post("", status_code=201, dependencies=write)
    def upload(request: Request, package: Annotated[UploadFile, File()]) -> dict[str, Any]:
        """Register a package archive; the first version of a model becomes active, later ones wait for
        `activate`. Re-uploading an identical id@version is accepted and changes nothing (`new: false`)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > admin.max_upload_bytes + 65536:
            raise HTTPException(413, f"package larger than {admin.max_upload_bytes} bytes")
        with tempfile.TemporaryDirectory(prefix="radai-upload-") as tmp:
            archive = Path(tmp) / "package.archive"
            size = 0
            with archive.open("wb") as out:
                while chunk := package.file.read(1 << 20):
                    size += len(chunk)
                    if size > admin.max_upload_bytes:
                        raise HTTPException(413, f"package larger than {admin.max_upload_bytes} bytes")
                    out.write(chunk)
            try:
                view, new = admin.add_archive(archive, Path(tmp) / "unpacked")
            except RadaiError as exc:
                raise _fail(exc) from exc
            finally:
                shutil.rmtree(Path(tmp) / "unpacked", ignore_errors=True)
        return {"model": view, "new": new}

    @router.post("/{model_id}/activate", dependencies=write)
    def activate(model_id: str, body: VersionBody) -> ModelView:
        """New jobs of this model use `version` from now on; running jobs finish on theirs."""
        try:
            return admin.activate(f"{model_id}@{body.version}")
        except RadaiError as exc:
            raise _fail(exc) from exc

    @router.post("/{model_id}/shadow", dependencies=write)
    def shadow(model_id: str, body: ShadowBody) -> dict[str, Any]:
        """Run `version` in shadow of the active version (results compared, never sent); null stops it."""
        try:
            return {"shadow": admin.set_shadow(model_id, body.version)}
        except RadaiError as exc:
            raise _fail(exc) from exc

    @router.delete("/{model_id}", dependencies=write)
    def remove(model_id: str, version: str | None = None) -> dict[str, list[str]]:
        """Remove one version (not the active one while others exist) or, without `version`, the model."""
        try:
            return {"removed": admin.remove(model_id if version is None else f"{model_id}@{version}")}
        except (RadaiError, ModelPackageError) as exc:
            raise _fail(exc) from exc

    return router
