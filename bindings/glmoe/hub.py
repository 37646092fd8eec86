"""Llama.from_pretrained's download: the one file of a Hugging Face Hub repository that a glob
pattern matches, as llama-cpp-python finds it, through huggingface_hub (imported only here, and
only when called: it is an optional dependency, as in llama-cpp-python).

Online, the repository's file list comes from the Hub. With HF_HUB_OFFLINE=1 it is the cached
snapshot's (in cache_dir or local_dir), so that a model downloaded once loads without a network."""
from __future__ import annotations

import fnmatch
import json
import os
from typing import List, Optional, Sequence


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError("Llama.from_pretrained needs the huggingface-hub package: "
                          "pip install huggingface-hub") from None
    return huggingface_hub


def _cached_files(hub, repo_id: str, local_dir, cache_dir) -> List[str]:
    folder = hub.snapshot_download(repo_id, cache_dir=cache_dir, local_dir=local_dir, local_files_only=True)
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".cache"]  # huggingface_hub's bookkeeping in a local_dir
        files += [os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/") for n in names]
    return sorted(files)


def repo_files(repo_id: str, local_dir=None, cache_dir=None) -> List[str]:
    """The repository's file paths (relative, with "/")."""
    hub = _hub()
    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    if constants.HF_HUB_OFFLINE:
        return _cached_files(hub, repo_id, local_dir, cache_dir)
    return sorted(hub.HfApi().list_repo_files(repo_id))


def only_match(files: Sequence[str], pattern: str, repo_id: str) -> str:
    """The one file that pattern (fnmatch, as llama-cpp-python) matches; ValueError for none or several."""
    matches = [f for f in files if fnmatch.fnmatch(f, pattern)]
    if not matches:
        raise ValueError(f"No file found in {repo_id} that matches {pattern}\n\n"
                         f"Available files:\n{json.dumps(list(files))}")
    if len(matches) > 1:
        raise ValueError(f"Multiple files found in {repo_id} matching {pattern}: {json.dumps(matches)}")
    return matches[0]


def download_model(repo_id: str, filename: str, additional_files: Optional[Sequence[str]] = None,
                   local_dir=None, cache_dir=None) -> str:
    """Downloads (or finds in the cache) the file filename matches, and those additional_files
    match, and returns the local path of the first."""
    if not isinstance(filename, str) or not filename:
        raise ValueError("filename must be a file name or glob pattern")
    hub = _hub()
    files = repo_files(repo_id, local_dir=local_dir, cache_dir=cache_dir)
    wanted = [only_match(files, filename, repo_id)] + [only_match(files, p, repo_id) for p in additional_files or []]
    paths = [hub.hf_hub_download(repo_id=repo_id, filename=f, local_dir=local_dir, cache_dir=cache_dir)
             for f in wanted]
    return paths[0]
