"""Configuration: TOML found at --config, $STREAMD_CONFIG, $CONFIGURATION_DIRECTORY, then XDG.

A provider is enabled when its key can be found (config file path, environment variable, or a
systemd credential). Unknown keys are errors naming their path. Secrets are wrapped in `Secret`,
whose repr never shows the value.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import platformdirs

APP = "streamd"


class ConfigError(Exception):
    """A user mistake in configuration: the message names the file and the key."""


class Secret:
    """A credential. str() and repr() hide it; only `reveal()` gives the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not to be pickled")


# -- the file's schema ---------------------------------------------------------------------------
class _Strict(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ProviderFile(_Strict):
    api_key_env: str | None = None
    api_key_file: str | None = None
    api_key_credential: str | None = None
    api_secret_env: str | None = None  # Wiro's signature mode
    api_secret_file: str | None = None
    api_secret_credential: str | None = None
    base_url: str | None = None
    socket_url: str | None = None  # Wiro
    ws_url: str | None = None  # Runware
    poll_interval: float | None = None  # seconds between polls of an active job
    enabled: bool = True


class ProvidersFile(_Strict):
    oxen: ProviderFile | None = None
    wiro: ProviderFile | None = None
    runware: ProviderFile | None = None
    apiframe: ProviderFile | None = None


class DaemonFile(_Strict):
    socket: str | None = None
    state_dir: str | None = None
    socket_mode: str = "0600"
    socket_group: str | None = None
    stalled_after: float = 300.0
    retention_events: int = 1_000_000
    retention_days: float = 30.0
    log_level: str = "info"


class ArchiveFile(_Strict):
    enabled: bool = False
    dir: str | None = None
    quota_mb: float = 2048.0
    max_age_days: float = 30.0
    max_file_mb: float = 100.0
    concurrency: int = 4


class RedisMirrorFile(_Strict):
    url: str
    stream: str = "streamd:events"
    maxlen: int = 1_000_000


class MirrorFile(_Strict):
    redis: RedisMirrorFile | None = None


class ConfigFile(_Strict):
    daemon: DaemonFile = msgspec.field(default_factory=DaemonFile)
    providers: ProvidersFile = msgspec.field(default_factory=ProvidersFile)
    archive: ArchiveFile = msgspec.field(default_factory=ArchiveFile)
    mirror: MirrorFile = msgspec.field(default_factory=MirrorFile)


# -- the resolved configuration -----------------------------------------------------------------
DEFAULTS: dict[str, dict[str, str]] = {
    "oxen": {"api_key_env": "OXEN_API_KEY", "base_url": "https://hub.oxen.ai"},
    "wiro": {
        "api_key_env": "WIRO_API_KEY",
        "api_secret_env": "WIRO_API_SECRET",
        "base_url": "https://api.wiro.ai/v1",
        "socket_url": "wss://socket.wiro.ai/v1",
    },
    "runware": {
        "api_key_env": "RUNWARE_API_KEY",
        "base_url": "https://api.runware.ai/v1",
        "ws_url": "wss://ws-api.runware.ai/v1",
    },
    "apiframe": {"api_key_env": "APIFRAME_API_KEY", "base_url": "https://api.apiframe.ai"},
}
PROVIDERS = tuple(DEFAULTS)


@dataclass(frozen=True)
class ProviderSettings:
    name: str
    key: Secret
    base_url: str
    secret: Secret | None = None
    socket_url: str | None = None
    ws_url: str | None = None
    poll_interval: float | None = None
    options: dict[str, Any] = field(default_factory=dict)  # emulator knobs and the like


@dataclass(frozen=True)
class Config:
    socket: Path
    state_dir: Path
    providers: dict[str, ProviderSettings]
    daemon: DaemonFile = field(default_factory=DaemonFile)
    archive: ArchiveFile = field(default_factory=ArchiveFile)
    mirror: MirrorFile = field(default_factory=MirrorFile)
    source: Path | None = None


def default_socket() -> Path:
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0]) / "streamd.sock"
    return Path(platformdirs.user_runtime_dir(APP)) / "streamd.sock"


def default_state_dir() -> Path:
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    return Path(platformdirs.user_state_dir(APP))


def find_config(explicit: str | None) -> Path | None:
    """The first config file that applies; an explicit one that is missing is an error."""
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        return path
    env = os.environ.get("STREAMD_CONFIG")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(f"config file {path} (from $STREAMD_CONFIG) not found")
        return path
    candidates = []
    if os.environ.get("CONFIGURATION_DIRECTORY"):
        candidates.append(Path(os.environ["CONFIGURATION_DIRECTORY"].split(":")[0]) / "streamd.toml")
    candidates.append(Path(platformdirs.user_config_dir(APP)) / "streamd.toml")
    return next((p for p in candidates if p.is_file()), None)


def parse_file(text: str, source: str) -> ConfigFile:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        return msgspec.convert(data, ConfigFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def _describe(exc: msgspec.ValidationError) -> str:
    """msgspec says 'Object contains unknown field `x` - at `$.providers.oxen`'; say it as a key path."""
    text = str(exc)
    message, _, where = text.partition(" - at `")
    where = where.rstrip("`").removeprefix("$").lstrip(".")
    if message.startswith("Object contains unknown field `"):
        name = message.split("`")[1]
        return f"unknown key {'.'.join(p for p in (where, name) if p)}"
    return f"{message} at {where or 'top level'}" if where else message


def _read_secret(
    provider: str, what: str, env_name: str | None, file: str | None, credential: str | None
) -> Secret | None:
    """A secret from a file, a systemd credential, or the environment, in that order."""
    if file:
        path = Path(file).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"providers.{provider}.{what}_file: cannot read {path}: {exc.strerror}") from None
        if not value:
            raise ConfigError(f"providers.{provider}.{what}_file: {path} is empty")
        return Secret(value)
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds:
        name = credential or (env_name.lower() if env_name else None)
        if name and (Path(creds) / name).is_file():
            value = (Path(creds) / name).read_text().strip()
            if value:
                return Secret(value)
    if env_name:
        value = os.environ.get(env_name, "").strip()
        if value:
            return Secret(value)
    return None


def resolve(
    cfg: ConfigFile,
    *,
    source: Path | None = None,
    socket: str | None = None,
    state_dir: str | None = None,
) -> Config:
    try:
        return _resolve(cfg, source=source, socket=socket, state_dir=state_dir)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None


def _resolve(cfg: ConfigFile, *, source: Path | None, socket: str | None, state_dir: str | None) -> Config:
    providers: dict[str, ProviderSettings] = {}
    for name in PROVIDERS:
        pf: ProviderFile = getattr(cfg.providers, name) or ProviderFile()
        if not pf.enabled:
            continue
        d = DEFAULTS[name]
        key = _read_secret(name, "api_key", pf.api_key_env or d["api_key_env"], pf.api_key_file, pf.api_key_credential)
        if key is None:
            continue
        secret = None
        if name == "wiro":
            secret = _read_secret(
                name,
                "api_secret",
                pf.api_secret_env or d["api_secret_env"],
                pf.api_secret_file,
                pf.api_secret_credential,
            )
        providers[name] = ProviderSettings(
            name=name,
            key=key,
            secret=secret,
            base_url=(pf.base_url or d["base_url"]).rstrip("/"),
            socket_url=pf.socket_url or d.get("socket_url"),
            ws_url=pf.ws_url or d.get("ws_url"),
            poll_interval=pf.poll_interval,
        )
    sock = Path(socket or cfg.daemon.socket or default_socket()).expanduser()
    state = Path(state_dir or cfg.daemon.state_dir or default_state_dir()).expanduser()
    try:
        int(cfg.daemon.socket_mode, 8)
    except ValueError:
        raise ConfigError(f"daemon.socket_mode: {cfg.daemon.socket_mode!r} is not an octal mode") from None
    return Config(
        socket=sock,
        state_dir=state,
        providers=providers,
        daemon=cfg.daemon,
        archive=cfg.archive,
        mirror=cfg.mirror,
        source=source,
    )


def load(explicit: str | None = None, *, socket: str | None = None, state_dir: str | None = None) -> Config:
    path = find_config(explicit)
    cfg = ConfigFile()
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror}") from None
        cfg = parse_file(text, str(path))
    return resolve(cfg, source=path, socket=socket, state_dir=state_dir)
