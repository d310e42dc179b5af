"""Download a Hugging Face model into the cache vLLM mounts, and copy the parser plugins it names.

Run with the appliance venv's Python (it has huggingface_hub):
    stage_llm.py MODEL HF_HOME PLUGINS_DIR MARKER [PLUGIN_FILE ...]
The marker is written last, so an interrupted download is resumed on the next run.
"""

import shutil
import sys
from pathlib import Path

from huggingface_hub import snapshot_download


def main(model: str, hf_home: str, plugins_dir: str, marker: str, *plugins: str) -> None:
    snapshot = Path(snapshot_download(model, cache_dir=Path(hf_home) / "hub"))
    for name in plugins:
        source = snapshot / name
        if not source.is_file():
            sys.exit(f"{model} has no {name}, which the plan's vLLM arguments name")
        shutil.copyfile(source, Path(plugins_dir) / name)
    Path(marker).parent.mkdir(parents=True, exist_ok=True)
    Path(marker).write_text(f"{model} {snapshot.name}\n")
    print(f"staged {model} at revision {snapshot.name}")


if __name__ == "__main__":
    main(*sys.argv[1:])
