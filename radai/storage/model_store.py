"""The model registry on disk: installed packages side by side, which version of each model is active, which
runs in shadow.

Layout under the registry folder (default `<data_dir>/models`):

    packages/<id>/<version>/   an installed package (copied in, validated, then renamed into place)
    state.json                 {"active": {id: version}, "shadow": {id: version}, "disabled": [id]}

Bundled packages (the search paths of `models.paths`, by default the packages shipped with radai) are listed
too but never written. A model's active version is the one state.json names, else its newest version. The
CLI, the HTTP API and a running server share this folder: writers take an exclusive lock and replace
state.json atomically; the server notices the change and switches new jobs over (radai.hosting).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from radai.errors import ModelPackageError, NotFoundError
from radai.models.manifest import load_card
from radai.models.registry import ModelPackage, open_package, version_key

log = logging.getLogger(__name__)

Source = Literal["bundled", "installed"]
Validate = Callable[[Path], ModelPackage]  # full registration checks of a package folder


@dataclass(frozen=True)
class Entry:
    """One version of one model, where it comes from and what the server does with it."""

    package: ModelPackage
    source: Source
    active: bool = False
    shadow: bool = False

    @property
    def key(self) -> str:
        return self.package.key


@dataclass(frozen=True)
class Selection:
    """What a server runs: per model id the active package, and the shadow package where one is set."""

    active: dict[str, ModelPackage] = field(default_factory=dict)
    shadow: dict[str, ModelPackage] = field(default_factory=dict)
    # Models whose pinned active version no longer opens (files changed on disk): a server keeps serving
    # the copy it has loaded rather than switch to another version nobody activated.
    broken: frozenset[str] = frozenset()

    @property
    def keys(self) -> tuple[frozenset[str], frozenset[str]]:
        return (
            frozenset(p.key for p in self.active.values()),
            frozenset(p.key for p in self.shadow.values()),
        )


@dataclass(frozen=True)
class Added:
    entry: Entry
    new: bool  # False: the same id@version with the same weights was already registered


def parse_ref(ref: str) -> tuple[str, str | None]:
    """`ID` or `ID@VERSION` -> (id, version or None)."""
    model_id, sep, version = ref.strip().partition("@")
    if not model_id or (sep and not version):
        raise ModelPackageError(f"{ref!r} is not ID or ID@VERSION")
    return model_id, version or None


class ModelStore:
    def __init__(self, root: Path, bundled: Sequence[Path] = (), enabled: Sequence[str] = ()) -> None:
        self.root = root
        self._bundled = list(bundled)
        self._enabled = set(enabled)
        self._cache: dict[Path, tuple[tuple[int, ...], ModelPackage | None]] = {}

    # -- reading -------------------------------------------------------------------------------------------

    @property
    def _packages_dir(self) -> Path:
        return self.root / "packages"

    def _state(self) -> dict[str, object]:
        try:
            raw = json.loads((self.root / "state.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"active": {}, "shadow": {}, "disabled": []}
        except (OSError, ValueError) as exc:
            raise ModelPackageError(f"model registry state is unreadable: {exc}") from exc
        return raw if isinstance(raw, dict) else {}

    def _open_cached(self, directory: Path) -> ModelPackage | None:
        """open_package (which hashes the weights) once per change of the card or weights files."""
        try:
            card_stat = (directory / "model.yaml").stat()
            stamp = [card_stat.st_mtime_ns, card_stat.st_size]
            for f in sorted(directory.glob("*.onnx")):
                st = f.stat()
                stamp += [st.st_mtime_ns, st.st_size]
        except OSError:
            return None
        cached = self._cache.get(directory)
        if cached is not None and cached[0] == tuple(stamp):
            return cached[1]
        try:
            pkg: ModelPackage | None = open_package(directory)
        except ModelPackageError as exc:
            log.error("skipping model package: %s", exc)
            pkg = None
        self._cache[directory] = (tuple(stamp), pkg)
        return pkg

    def _scan(self) -> list[tuple[ModelPackage, Source]]:
        found: dict[str, tuple[ModelPackage, Source]] = {}
        roots: list[tuple[Path, str, Source]] = [(r, "*/model.yaml", "bundled") for r in self._bundled]
        roots.append((self._packages_dir, "*/*/model.yaml", "installed"))
        for root, pattern, source in roots:
            if not root.is_dir():
                continue
            for card_path in sorted(root.glob(pattern)):
                pkg = self._open_cached(card_path.parent)
                if pkg is None or (self._enabled and pkg.card.id not in self._enabled):
                    continue
                found.setdefault(pkg.key, (pkg, source))  # installed never shadows a bundled copy
        return list(found.values())

    def entries(self) -> list[Entry]:
        """Every version of every model, ordered by id then version."""
        state = self._state()
        scanned = self._scan()
        selection = self._select(scanned, state)
        active_keys, shadow_keys = selection.keys
        out = [
            Entry(pkg, source, active=pkg.key in active_keys, shadow=pkg.key in shadow_keys)
            for pkg, source in scanned
        ]
        return sorted(out, key=lambda e: (e.package.card.id, version_key(e.package.card.version)))

    def selection(self) -> Selection:
        """The active and shadow version of each enabled model."""
        return self._select(self._scan(), self._state())

    @staticmethod
    def _select(scanned: Sequence[tuple[ModelPackage, Source]], state: dict[str, object]) -> Selection:
        by_id: dict[str, dict[str, ModelPackage]] = {}
        for pkg, _ in scanned:
            by_id.setdefault(pkg.card.id, {})[pkg.card.version] = pkg
        active_state = state.get("active") if isinstance(state.get("active"), dict) else {}
        shadow_state = state.get("shadow") if isinstance(state.get("shadow"), dict) else {}
        disabled_state = state.get("disabled")
        disabled = set(disabled_state) if isinstance(disabled_state, list) else set()
        selection = Selection()
        broken: set[str] = set()
        for model_id, versions in by_id.items():
            if model_id in disabled:
                continue
            pinned = active_state.get(model_id) if isinstance(active_state, dict) else None
            if isinstance(pinned, str) and pinned not in versions:
                log.error("model %s: the active version %s is missing or invalid", model_id, pinned)
                broken.add(model_id)
                continue
            newest = max(versions, key=version_key)
            selection.active[model_id] = versions[pinned] if isinstance(pinned, str) else versions[newest]
            shadow = shadow_state.get(model_id) if isinstance(shadow_state, dict) else None
            if (
                isinstance(shadow, str)
                and shadow in versions
                and versions[shadow] is not selection.active[model_id]
            ):
                selection.shadow[model_id] = versions[shadow]
        return Selection(selection.active, selection.shadow, frozenset(broken))

    def find(self, ref: str) -> Entry:
        """The entry for `ID@VERSION`, or the active version for `ID`."""
        model_id, version = parse_ref(ref)
        matches = [e for e in self.entries() if e.package.card.id == model_id]
        if not matches:
            raise NotFoundError(f"no model {model_id!r} is registered")
        for e in matches:
            if (version is None and e.active) or e.package.card.version == version:
                return e
        if version is None:
            raise NotFoundError(f"model {model_id!r} is disabled (activate a version to serve it)")
        have = ", ".join(e.package.card.version for e in matches)
        raise NotFoundError(f"model {model_id!r} has no version {version} (registered: {have})")

    # -- writing -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, object]]:
        """Exclusive lock over the registry; yields the state, written back atomically on success."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self._state()
            yield state
            tmp = self.root / f".state-{uuid.uuid4().hex}.json"
            with tmp.open("w", encoding="utf-8") as f:
                json.dump(state, f, indent=2, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.root / "state.json")

    @staticmethod
    def _map(state: dict[str, object], name: str) -> dict[str, str]:
        value = state.get(name)
        if not isinstance(value, dict):
            value = {}
            state[name] = value
        return value

    @staticmethod
    def _disabled(state: dict[str, object]) -> list[str]:
        value = state.get("disabled")
        if not isinstance(value, list):
            value = []
            state["disabled"] = value
        return value

    def add(self, source_dir: Path, validate: Validate) -> Added:
        """Copy a package in, validate the copy (what is checked is what is installed), then move it into
        place. The first version of a model becomes active; later versions wait for `activate`."""
        card = load_card(source_dir)
        staging = self.root / ".incoming" / uuid.uuid4().hex
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(source_dir, staging, symlinks=True)
            pkg = validate(staging)
            if pkg.key != card.key:  # the card changed while being copied
                raise ModelPackageError(f"{card.key}: the package changed while it was being added")
            with self._locked() as state:
                existing = {e.key: e for e in self.entries()}
                if pkg.key in existing:
                    old = existing[pkg.key]
                    if old.package.card.runtime.sha256 != pkg.card.runtime.sha256:
                        raise ModelPackageError(
                            f"{pkg.key} is already registered with different weights; give the new one "
                            "another version"
                        )
                    return Added(old, new=False)
                others = [e for e in existing.values() if e.package.card.id == pkg.card.id]
                target = self._packages_dir / pkg.card.id / pkg.card.version
                target.parent.mkdir(parents=True, exist_ok=True)
                staging.replace(target)
                active = self._map(state, "active")
                disabled = self._disabled(state)
                current = next((e for e in others if e.active), None)
                if current is not None:
                    active[pkg.card.id] = current.package.card.version  # adding never switches versions
                else:
                    active[pkg.card.id] = pkg.card.version
                    if pkg.card.id in disabled:
                        disabled.remove(pkg.card.id)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return Added(self.find(pkg.key), new=True)

    def activate(self, ref: str) -> Entry:
        """Make `ID@VERSION` the version new jobs of that model use (and stop shadowing it)."""
        model_id, version = parse_ref(ref)
        if version is None:
            raise ModelPackageError(f"activate needs ID@VERSION, got {ref!r}")
        with self._locked() as state:
            if not any(e.key == f"{model_id}@{version}" for e in self.entries()):
                self.find(ref)  # raises NotFoundError naming the registered versions
            self._map(state, "active")[model_id] = version
            shadow = self._map(state, "shadow")
            if shadow.get(model_id) == version:
                del shadow[model_id]
            disabled = self._disabled(state)
            if model_id in disabled:
                disabled.remove(model_id)
        return self.find(ref)

    def set_shadow(self, ref: str) -> Entry:
        """Run `ID@VERSION` in shadow of the active version: on live traffic, results not sent."""
        model_id, version = parse_ref(ref)
        if version is None:
            raise ModelPackageError(f"shadow needs ID@VERSION, got {ref!r}")
        entry = self.find(ref)
        if entry.active:
            raise ModelPackageError(f"{entry.key} is the active version; shadow another version")
        with self._locked() as state:
            self._map(state, "shadow")[model_id] = version
        return self.find(ref)

    def clear_shadow(self, model_id: str) -> bool:
        with self._locked() as state:
            return self._map(state, "shadow").pop(model_id, None) is not None

    def remove(self, ref: str) -> list[str]:
        """Remove `ID@VERSION` (not the active one while others exist), or every version of `ID`. Bundled
        packages cannot be deleted: removing their model disables it. Returns what was removed/disabled."""
        model_id, version = parse_ref(ref)
        with self._locked() as state:
            matches = [e for e in self.entries() if e.package.card.id == model_id]
            if version is not None:
                matches = [e for e in matches if e.package.card.version == version]
            if not matches:
                self.find(ref)
                raise NotFoundError(f"no model {ref!r} is registered")
            every = version is None
            if not every:
                (entry,) = matches
                siblings = [e for e in self.entries() if e.package.card.id == model_id and e is not entry]
                if entry.source == "bundled":
                    raise ModelPackageError(
                        f"{entry.key} is bundled with radai; `remove {model_id}` disables it"
                    )
                if entry.active and siblings:
                    raise ModelPackageError(
                        f"{entry.key} is the active version; activate another version first"
                    )
            removed: list[str] = []
            for e in matches:
                if e.source == "installed":
                    self._delete(e.package.directory)
                    removed.append(e.key)
            active, shadow = self._map(state, "active"), self._map(state, "shadow")
            if every or active.get(model_id) == version:
                active.pop(model_id, None)
            if every or shadow.get(model_id) == version:
                shadow.pop(model_id, None)
            if every and any(e.source == "bundled" for e in matches):
                disabled = self._disabled(state)
                if model_id not in disabled:
                    disabled.append(model_id)
                removed.append(f"{model_id} (bundled: disabled)")
        return removed

    def _delete(self, directory: Path) -> None:
        """Move out of the scanned tree first (atomic), then delete: a scan never sees half a package."""
        trash = self.root / ".trash" / uuid.uuid4().hex
        trash.parent.mkdir(parents=True, exist_ok=True)
        directory.replace(trash)
        shutil.rmtree(trash, ignore_errors=True)
        with contextlib.suppress(OSError):
            directory.parent.rmdir()  # the id folder, once empty
