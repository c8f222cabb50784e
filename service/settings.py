"""Deployment settings of the HTTP service, read from `LTD_*` environment variables (or a `.env` file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Where the data lives, how to reach Ray, who may write; never hyperparameters (those travel in job configs)."""

    model_config = SettingsConfigDict(env_prefix="LTD_", env_file=".env", extra="ignore", frozen=True)

    store_root: Path = Field(Path("store"), description="Label store root: labelsets are folders under it")
    runs_root: Path = Field(Path("runs"), description="Run folders: jobs write runs_root/<job_id>/, models are read "
                                                      "from here")
    data_root: Path | None = Field(
        None, description="Only dataset paths under this folder may appear in job configs (None: no paths at all)"
    )
    db_path: Path | None = Field(None, description="SQLite file of job records (None: runs_root/jobs.sqlite3)")
    share_stage1: bool = Field(
        True, description="Jobs with the same stage-I recipe (data, model, augmentation, seed, stage-I settings) start "
                          "from one finished stage I, kept in runs_root/stage1_cache, instead of each training it")
    jobs_per_device: int = Field(
        1, ge=1, le=64, description="Train and distill jobs that run side by side on one GPU (each gets that share of "
                                    "it and of its CPUs); on a cluster without GPUs, jobs that share its CPUs")
    api_key: SecretStr | None = Field(
        None, description="Key for mutating endpoints, sent as X-API-Key (None: the token in token_file, generated "
                          "at first start)")
    token_file: Path = Field(Path.home() / ".config" / "ltd" / "token",
                             description="Where the generated key is kept (mode 0600) when api_key is not set")
    no_auth: bool = Field(False, description="Leave mutating endpoints open (throwaway local use; `ltd serve` "
                                             "allows it on a loopback bind only, and warns at every start)")
    trash_days: float = Field(7.0, ge=0, description="Days a deleted labelset stays restorable in the store's trash "
                                                   "before the service purges it")
    read_key_required: bool = Field(False, description="Also require the key on read endpoints")
    ray_address: str | None = Field(None, description="Ray cluster address (None: RAY_ADDRESS, else a local Ray)")
    max_batch_ids: int = Field(10_000, ge=1, description="Most image ids one labels:batch request may ask for")
    max_upload_bytes: int = Field(16 * 2**20, ge=1024, description="Largest request body (predict and model uploads), bytes")
    max_upload_files: int = Field(256, ge=1, description="Most images one predict request may carry")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="Largest decoded image (width x height) accepted")
    reader_cache_size: int = Field(16, ge=1, description="Labelset readers kept open (each caches decoded chunks)")
    reader_cache_mib: float = Field(256, gt=0, description="Decoded-chunk cache per labelset reader, MiB")
    model_cache_size: int = Field(4, ge=1, description="Loaded models kept in memory (LRU by file and mtime)")
    device: str = Field("auto", description="Inference device: 'auto' picks CUDA when present, else CPU")
    inference_threads: int = Field(
        1, ge=1, description="torch intra-op threads on CPU: requests already run in parallel threads, and more "
                             "threads per forward oversubscribe the cores (measured: 50x slower on a busy 2-core host)")

    predict_batching: bool = Field(True, description="Batch concurrent predict requests for the same model into "
                                                     "shared forward passes (a dynamic batcher)")
    predict_max_batch: int = Field(64, ge=1, description="Most images in one batched forward pass")
    predict_max_wait_ms: float = Field(0.0, ge=0, le=1000, description="How long a batch waits for more requests "
                                       "(0: never; requests that arrive during a forward pass form the next batch)")

    @property
    def jobs_db(self) -> Path:
        """The SQLite file of job records."""
        return self.db_path or self.runs_root / "jobs.sqlite3"


@lru_cache
def get_settings() -> Settings:
    """Settings from the environment, read once per process (tests build their own `Settings` instead)."""
    return Settings()
