"""Routes of files: whole files streamed both ways, entries (list, stat, exists, make
a directory, remove, rename, chown, tmpfs) and directory trees as tar streams."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from sandvm.server.models import (
    MAX_LIST_DEPTH,
    ChownRequest,
    DirTransfer,
    EntryInfo,
    EntryList,
    Exists,
    MadeDir,
    MakeDirRequest,
    RenameRequest,
    TmpfsRequest,
    TreeEvent,
    WriteResult,
)
from sandvm.server.routes.common import (
    GuestPath,
    NDJSONResponse,
    OctetStreamResponse,
    SandboxId,
    Tenant,
    ndjson_response,
    pick,
    service,
)
from sandvm.values import DirTransfer as LocalDirTransfer
from sandvm.values import EntryInfo as LocalEntryInfo

router = APIRouter()


@router.put("/v1/sandboxes/{sandbox_id}/files", response_model=WriteResult, tags=["files"],
            responses=pick(400, 401, 403, 404, 409, 413),
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string",
                                                        "format": "binary"}}}}})
async def upload_file(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                      path: GuestPath, mode: Annotated[int, Query(
                          ge=0, le=0o7777, description="Permission bits.")] = 0o644,
                      make_parents: Annotated[bool, Query(
                          description="Create missing parent directories.")] = True
                      ) -> WriteResult:
    """Write the request body to ``path`` (streamed; atomic: whole or not at all)."""
    length = request.headers.get("content-length")
    return await service(request).upload(
        tenant, sandbox_id, path, request.stream(),
        length=int(length) if length and length.isdigit() else None, mode=mode,
        make_parents=make_parents)


@router.get("/v1/sandboxes/{sandbox_id}/files", response_class=OctetStreamResponse,
            tags=["files"], responses={
                200: {"content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}},
                    "description": "The file's bytes."},
                **pick(400, 401, 404, 409, 413)})
async def download_file(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                        path: GuestPath, max_bytes: Annotated[int | None, Query(
                            ge=0, description="Refuse (413) a larger file.")] = None
                        ) -> OctetStreamResponse:
    """The file's bytes, streamed (chunked: a body cut short means the read failed
    part-way)."""
    chunks = await service(request).download(tenant, sandbox_id, path,
                                              max_bytes=max_bytes)
    return OctetStreamResponse(chunks, headers={"Cache-Control": "no-store"})


@router.get("/v1/sandboxes/{sandbox_id}/files/list", response_model=EntryList,
            tags=["files"], responses=pick(400, 401, 403, 404, 409, 422))
async def list_files(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                     path: GuestPath, depth: Annotated[int, Query(
                         ge=1, le=MAX_LIST_DEPTH, description="Levels listed.")] = 1
                     ) -> EntryList:
    """The entries under a directory, sorted by name (``depth`` levels)."""
    entries = await service(request).on_sandbox(
        tenant, sandbox_id, lambda sb: sb.files.list(path, depth=depth))
    return EntryList(entries=[_entry(e) for e in entries])


@router.get("/v1/sandboxes/{sandbox_id}/files/stat", response_model=EntryInfo,
            tags=["files"], responses=pick(400, 401, 403, 404, 409, 422))
async def stat_file(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                    path: GuestPath) -> EntryInfo:
    """The entry at ``path`` (a symlink itself, not its target)."""
    return _entry(await service(request).on_sandbox(
        tenant, sandbox_id, lambda sb: sb.files.stat(path)))


@router.get("/v1/sandboxes/{sandbox_id}/files/exists", response_model=Exists,
            tags=["files"], responses=pick(400, 401, 404, 409, 422))
async def file_exists(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                      path: GuestPath) -> Exists:
    """Whether anything exists at ``path``."""
    return Exists(exists=await service(request).on_sandbox(
        tenant, sandbox_id, lambda sb: sb.files.exists(path)))


@router.post("/v1/sandboxes/{sandbox_id}/files/dir", response_model=MadeDir,
             tags=["files"], responses=pick(400, 401, 403, 404, 409, 422))
async def make_dir(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                   body: MakeDirRequest) -> MadeDir:
    """Create a directory and its parents (``created`` false: it existed)."""
    return MadeDir(created=await service(request).on_sandbox(
        tenant, sandbox_id, lambda sb: sb.files.make_dir(body.path, mode=body.mode)))


@router.delete("/v1/sandboxes/{sandbox_id}/files", status_code=204, response_class=Response,
               tags=["files"], responses=pick(400, 401, 403, 404, 409, 422))
async def remove_file(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                      path: GuestPath, recursive: Annotated[bool, Query(
                          description="Remove a directory with what it holds.")] = True
                      ) -> Response:
    """Remove a file, a symlink or a directory."""
    await service(request).on_sandbox(
        tenant, sandbox_id, lambda sb: sb.files.remove(path, recursive=recursive))
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/files/rename", response_model=EntryInfo,
             tags=["files"], responses=pick(400, 401, 403, 404, 409, 422))
async def rename_file(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                      body: RenameRequest) -> EntryInfo:
    """Move ``old_path`` to ``new_path``; returns the entry at its new path."""
    return _entry(await service(request).on_sandbox(
        tenant, sandbox_id, lambda sb: sb.files.rename(body.old_path, body.new_path,
                                                       overwrite=body.overwrite)))


@router.post("/v1/sandboxes/{sandbox_id}/files/chown", status_code=204,
             response_class=Response, tags=["files"],
             responses=pick(400, 401, 403, 404, 409, 422))
async def chown_file(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                     body: ChownRequest) -> Response:
    """Give ``path`` to ``user`` (and set its ``mode`` if given); a symlink is
    refused, not followed."""
    await service(request).on_sandbox(
        tenant, sandbox_id, lambda sb: sb.files.chown(body.path, user=body.user,
                                                      mode=body.mode))
    return Response(status_code=204)


@router.post("/v1/sandboxes/{sandbox_id}/files/tmpfs", status_code=204,
             response_class=Response, tags=["files"],
             responses=pick(400, 401, 403, 404, 409, 422))
async def mount_tmpfs(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                      body: TmpfsRequest) -> Response:
    """Mount a private tmpfs at ``path`` (memory only: never on a disk or in a
    snapshot's disk layer; nosuid, nodev, noexec; at most ``size_bytes``)."""
    await service(request).on_sandbox(
        tenant, sandbox_id, lambda sb: sb.files.mount_tmpfs(
            body.path, mode=body.mode, user=body.user, size_bytes=body.size_bytes))
    return Response(status_code=204)


@router.put("/v1/sandboxes/{sandbox_id}/files/tree", response_model=DirTransfer,
            tags=["files"], responses=pick(400, 401, 403, 404, 409, 413, 422),
            openapi_extra={"requestBody": {"required": True, "content": {
                "application/x-tar": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload_tree(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                      path: GuestPath) -> DirTransfer:
    """Extract the request body, a tar stream, into the guest directory ``path``
    (created if missing; streamed, capped like file uploads). The guest refuses
    absolute or escaping paths and links leading out: those are skipped and named."""
    length = request.headers.get("content-length")
    return _transfer(await service(request).upload_tree(
        tenant, sandbox_id, path, request.stream(),
        length=int(length) if length and length.isdigit() else None))


@router.get("/v1/sandboxes/{sandbox_id}/files/tree", response_class=NDJSONResponse,
            tags=["files"], responses={
                200: {"model": TreeEvent, "description": "One JSON object per line: the"
                      " tree as a tar stream (PAX) in `data` pieces, then one `end` or"
                      " `error`."},
                **pick(400, 401, 403, 404, 409, 413, 422)})
async def download_tree(request: Request, tenant: Tenant, sandbox_id: SandboxId,
                        path: GuestPath,
                        max_bytes: Annotated[int | None, Query(
                            ge=1, description="Refuse (413) more file content.")] = None,
                        max_files: Annotated[int | None, Query(
                            ge=1, le=1 << 24, description="Refuse (413) more"
                            " entries.")] = None) -> NDJSONResponse:
    """The guest directory ``path`` as a tar stream, in NDJSON pieces. Extract it as
    hostile input: it comes from the guest (the SDK's ``download_dir`` does)."""
    events = await service(request).download_tree(tenant, sandbox_id, path,
                                                   max_bytes=max_bytes,
                                                   max_files=max_files)
    return ndjson_response(events)


def _entry(e: LocalEntryInfo) -> EntryInfo:
    return EntryInfo(path=e.path, name=e.name, type=e.type,  # type: ignore[arg-type]
                     size=e.size, mode=e.mode, mtime=e.mtime, uid=e.uid, gid=e.gid,
                     target=e.target)


def _transfer(t: LocalDirTransfer) -> DirTransfer:
    return DirTransfer(files=t.files, dirs=t.dirs, symlinks=t.symlinks, bytes=t.bytes,
                       skipped=list(t.skipped))
