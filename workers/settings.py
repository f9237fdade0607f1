"""One typed settings object, read in one place.

Values come from environment variables ``DISCFLOW_*`` and, when ``DISCFLOW_CONFIG``
names one, a TOML file (environment wins).
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource


def _default_home() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "discflow"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISCFLOW_", extra="ignore")

    broker_url: str | None = None
    """Redis URL shared by the CLI and every worker. None: the CLI starts an embedded one."""
    spool_dir: Path = _default_home() / "spool"
    """Directory tree keyed by job id; every worker must mount it at the same path."""
    database_url: str | None = None
    """The job ledger: a SQLAlchemy URL (postgresql://user@host/db). None: a SQLite file in data_dir."""
    data_dir: Path | None = None
    """Where the default SQLite ledger (ledger.sqlite3) lives; None: the spool's parent folder."""

    api_token: str | None = None
    """Bearer token the HTTP API requires (`discflow api` refuses to start without one)."""
    api_host: str = "127.0.0.1"
    api_port: int = 8700
    flower_basic_auth: str | None = None
    """user:password[,user2:password2] for Flower (`discflow flower` refuses to start without it)."""
    flower_address: str = "127.0.0.1"
    flower_port: int = 5555
    audit_syslog: str | None = None
    """Also send DICOM audit messages to syslog: udp://host:514, tcp://host:601 or unix:///dev/log."""
    audit_source_id: str | None = None
    """AuditSourceID in audit messages; None: this host's name."""

    batch_size: int = 50
    """Instances per transcode task of an export. Each task costs ~10-20 ms of Celery; batches of
    10-200 export within ~10 % of each other on 2 processes (docs/performance.md: per-task
    overhead), and 10 tasks per 500-image study still balance over up to ~5 worker processes."""
    import_batch_size: int = 100
    """Instances per store task of an import: each opens its own associations, and a PACS pays for
    every one it sets up (Orthanc ingests 500 JPEG slices 5-10 % faster in batches of 100 than of 50)."""
    scan_chunk_files: int = 250
    """Files per header-reading task of an export: a larger source is scanned by several at once."""
    worker_concurrency: int = 0
    """Processes per embedded worker; 0 means one per CPU."""
    job_timeout_seconds: float = 3600.0
    visibility_timeout_seconds: int = 600
    """A task whose worker vanished (SIGKILL, power loss) is handed to another worker after this long.
    A batch still running then is run a second time elsewhere (harmless: tasks are idempotent), so keep
    it above the usual batch time; below it, a patient waits for a lost batch."""
    result_expires_seconds: int = 86400

    ae_title: str = "DISCFLOW"
    network_timeout_seconds: float = 30.0
    retrieve_associations: int = 4
    store_associations: int = 4
    store_retries: int = 3
    store_backoff_seconds: float = 0.5
    """First wait before a store retry; it doubles each time (0.5, 1, 2 s with the defaults)."""

    volume_capacity_bytes: int = 700 * 1000 * 1000
    """Usable bytes per volume (CD by default)."""
    volume_label: str = "DISCFLOW"
    institution_name: str = "discflow"

    viewer_dir: Path | None = None
    """Viewer bundle copied to VIEWER/ on every volume (with AUTORUN.INF); None: no viewer."""
    viewer_start: str | None = None
    """The viewer's start program, a path inside viewer_dir; default: its only top-level *.exe."""
    burn_hot_folder: Path | None = None
    """Disc-robot hot folder: each finished ISO volume is handed to the robot there."""
    burn_robot: str = "primera"
    """Which robot reads the hot folder: primera (PTBurn .JRQ) or epson (TD Bridge .JDF)."""
    burn_robot_path: str | None = None
    """The hot folder as the robot's PC sees it (e.g. C:\\PTBurnJobs); default: burn_hot_folder."""
    burn_device: str | None = None
    """Optical drive the CLI burns each volume to with xorriso (e.g. /dev/sr0)."""
    burn_copies: int = 1

    max_pixels_per_instance: int = 2_000_000_000
    """Rows x Columns x Frames x Samples beyond this are refused (decompression bombs)."""
    decode_timeout_seconds: float = 120.0
    """Decoding one imported instance (import --send uncompressed) runs in a child process that is
    killed after this many seconds (tasks.decode_guard); the instance is then reported, not stored."""
    decode_memory_bytes: int = 4 << 30
    """Address space that decode may use beyond what the worker maps already; more is refused."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        config_file = os.environ.get("DISCFLOW_CONFIG")
        if config_file:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=config_file))
        return tuple(sources)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reload_settings() -> Settings:
    get_settings.cache_clear()
    return get_settings()
