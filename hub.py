"""Pretrained weights from the Hugging Face hub: the local cache first, then a quick reachability check, then the
download, so a node without network access gets one clear line at once instead of a minute of retries.

Returns local file paths; model.py loads them (timm encoders through timm's own loader, MiT after renaming).
"""
import socket
import sys
from urllib.parse import urlparse

from labels import UserError

# Seconds to wait for the hub's TCP port before calling it unreachable.
REACH_TIMEOUT = 5
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _split(hub_id):
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def cached_file(hub_id, filenames=WEIGHT_FILES):
    """Path of the first of filenames that the local hub cache holds for hub_id, or None."""
    from huggingface_hub import try_to_load_from_cache
    repo, revision = _split(hub_id)
    for name in filenames:
        path = try_to_load_from_cache(repo, name, revision=revision)
        if isinstance(path, str):
            return path
    return None


def _unreachable(endpoint):
    """None when endpoint's host accepts a TCP connection within REACH_TIMEOUT, else the reason."""
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=REACH_TIMEOUT).close()
        return None
    except OSError as exc:
        return f"{url.hostname}:{port} not reachable: {exc.strerror or type(exc).__name__}"


def _fail(what, reason, remedy):
    raise UserError(f"--pretrained: could not fetch {what} ({reason}); run with network access (once is enough: "
                    f"the weights stay in the Hugging Face cache), {remedy}, or drop --pretrained")


def weights_file(hub_id, what, remedy="pass --weights FILE", filenames=WEIGHT_FILES):
    """Local path of hub_id's weights: from the cache, else downloaded; a UserError naming what and the remedy
    when the hub is offline (HF_HUB_OFFLINE), unreachable, or the download fails."""
    from huggingface_hub import constants, hf_hub_download
    found = cached_file(hub_id, filenames)
    if found:
        return found
    if constants.HF_HUB_OFFLINE:
        _fail(what, f"HF_HUB_OFFLINE is set and {hub_id} is not in the cache {constants.HF_HUB_CACHE}", remedy)
    reason = _unreachable(constants.ENDPOINT)
    if reason:
        _fail(what, f"{reason}; no network access from this node?", remedy)
    repo, revision = _split(hub_id)
    errors = []
    for name in filenames:
        try:
            return hf_hub_download(repo, name, revision=revision)
        except Exception as exc:  # the hub client raises many types (HTTP, missing entry, auth): try the next name
            errors.append(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}")
    _fail(what, "; ".join(errors), remedy)


def loaded(what, path, count):
    print(f"loaded {count} pretrained encoder tensors for {what} from {path}", file=sys.stderr, flush=True)
