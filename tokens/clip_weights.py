"""Checks on open_clip weights for clip_prune.py, made before any work (SPEC section 4 evaluation).

`--pretrained openai` on a machine without network used to retry for about a minute inside
huggingface_hub and end in a 40-line traceback. `check_pretrained` answers first, in one line:
a tag open_clip does not know, or a tag whose weights are not in the local cache while the
network is off (HF_HUB_OFFLINE set, or huggingface.co / the weights' host unreachable within a
few seconds). `load_error` turns a failure while reading weights (a truncated download, a
corrupt cache entry, a foreign file) into one complete line.
"""
import os
import socket
from typing import Optional
from urllib.parse import urlparse

NO_WEIGHTS = ("", "none", "None", "random")
PROBE_SECONDS = 3.0


def one_line(exc: BaseException, limit: int = 400) -> str:
    """The whole message of exc on one line (whitespace collapsed), cut at a word with '...' past `limit`."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return f"{type(exc).__name__}: {text}"


def offline_flag() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def reachable(host: str, port: int = 443, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds (DNS included)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_cached(repo_with_file: str, cache_dir: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    repo, filename = os.path.split(repo_with_file)  # as open_clip reads it: 'org/name/' means the default file
    names = [filename] if filename else [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return True
    return False


def _url_cached(url: str, cache_dir: Optional[str]) -> bool:
    folder = cache_dir or os.path.expanduser("~/.cache/clip")
    return os.path.isfile(os.path.join(folder, os.path.basename(url)))


def check_pretrained(model_name: str, pretrained: str, cache_dir: Optional[str] = None) -> Optional[str]:
    """None when the weights can be had; otherwise the one-line reason (the caller names the flag).

    Files, `--pretrained ''` (random weights) and `local-dir:` models need no network and pass. A known
    tag passes when its weights are cached or its host answers; `hf-hub:` models need the hub.
    """
    import open_clip
    if pretrained in NO_WEIGHTS or os.path.isfile(pretrained) or model_name.startswith("local-dir:"):
        return None
    if model_name.startswith("hf-hub:"):
        if offline_flag() or not reachable("huggingface.co"):
            repo = model_name[len("hf-hub:"):]
            if not _hf_cached(repo + "/", cache_dir):
                return (f"{model_name} is loaded from the Hugging Face hub, which cannot be reached "
                        f"(offline), and it is not in the cache; use --model local-dir:DIR")
        return None
    name = model_name.replace("/", "-")
    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        return f"not a file and not a known tag of {model_name} (tags: {tags})"
    if cfg.get("file"):
        return None
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if (hub and _hf_cached(hub, cache_dir)) or (url and _url_cached(url, cache_dir)):
        return None
    hosts = (["huggingface.co"] if hub else []) + ([urlparse(url).hostname] if url else [])
    if offline_flag() or not any(reachable(host) for host in hosts if host):
        why = "HF_HUB_OFFLINE is set" if offline_flag() else f"{' and '.join(h for h in hosts if h)} cannot be reached"
        return (f"the weights of {model_name} are not in the cache and {why}; pass a weights file "
                f"(--pretrained /path/to/weights.pt), --model local-dir:DIR, or --pretrained '' for random weights")
    return None


def load_error(model_name: str, pretrained: str, exc: BaseException) -> str:
    """One line for a failure while open_clip builds the model or reads its weights."""
    hint = ""
    if pretrained not in NO_WEIGHTS:
        hint = ("; a truncated or corrupt weights file (an interrupted download in the cache, e.g. "
                "~/.cache/huggingface or ~/.cache/clip) must be deleted and fetched again")
    return f"could not build {model_name} with weights {pretrained!r} ({one_line(exc)}){hint}"
