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

    batch_size: int = 25
    """Instances per transcode/store task (amortises per-task overhead)."""
    worker_concurrency: int = 0
    """Processes per embedded worker; 0 means one per CPU."""
    job_timeout_seconds: float = 3600.0
    result_expires_seconds: int = 86400

    ae_title: str = "DISCFLOW"
    network_timeout_seconds: float = 30.0
    retrieve_associations: int = 4
    store_associations: int = 4
    store_retries: int = 3

    volume_capacity_bytes: int = 700 * 1000 * 1000
    """Usable bytes per volume (CD by default)."""
    volume_label: str = "DISCFLOW"
    institution_name: str = "discflow"

    max_pixels_per_instance: int = 2_000_000_000
    """Rows x Columns x Frames x Samples beyond this are refused (decompression bombs)."""

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
