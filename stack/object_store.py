"""The S3-compatible object store of the single-host stack: moto's server mode (MinIO is
not installable here; sites use MinIO or AWS S3, see compose.yaml and the README).

moto runs with IAM authentication on: after the three unsigned calls that create the
`mlflow` user, its policy and its access key, every request must be signed with a key
moto knows. Only the MLflow server holds that key (clients reach artifacts through it).
moto keeps objects in memory: `save` and `restore` carry the bucket across a stop and
start in a folder; a crash loses what was stored since the last start.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from stack.processes import Service, Unhealthy

REGION = "us-east-1"
USER = "mlflow"
# The unsigned calls bootstrap() makes before moto starts to require signatures.
BOOTSTRAP_CALLS = 3
POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}


@dataclass(frozen=True)
class Keys:
    access_key_id: str
    secret_access_key: str

    def environment(self, endpoint: str) -> dict[str, str]:
        """What an S3 client (the MLflow server's boto3) reads."""
        return {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
                "AWS_DEFAULT_REGION": REGION, "MLFLOW_S3_ENDPOINT_URL": endpoint}


def client(endpoint: str, keys: Keys, service: str = "s3") -> BaseClient:
    return boto3.client(service, endpoint_url=endpoint, region_name=REGION, aws_access_key_id=keys.access_key_id,
                        aws_secret_access_key=keys.secret_access_key,
                        config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30))


def service(host: str, port: int, keys_file: Path, bucket: str) -> Service:
    def health() -> str:
        keys = read_keys(keys_file)
        if keys is None:
            raise Unhealthy("not bootstrapped yet (no access key)")
        try:
            client(f"http://{host}:{port}", keys).head_bucket(Bucket=bucket)
        except (BotoCoreError, ClientError) as exc:
            raise Unhealthy(f"s3://{bucket}: {exc}") from exc
        return f"s3://{bucket} answers signed requests on {host}:{port} (moto)"

    return Service("object-store", [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                   env={"INITIAL_NO_AUTH_ACTION_COUNT": str(BOOTSTRAP_CALLS)}, health=health)


def bootstrap(endpoint: str, keys_file: Path, bucket: str) -> Keys:
    """On a fresh moto: the `mlflow` user with full S3 rights, its access key (kept owner-only
    in `keys_file`), and the bucket."""
    unsigned = client(endpoint, Keys("bootstrap", "bootstrap"), "iam")
    unsigned.create_user(UserName=USER)
    unsigned.put_user_policy(UserName=USER, PolicyName="s3-all", PolicyDocument=json.dumps(POLICY))
    made = unsigned.create_access_key(UserName=USER)["AccessKey"]
    keys = Keys(made["AccessKeyId"], made["SecretAccessKey"])
    client(endpoint, keys).create_bucket(Bucket=bucket)
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(keys_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"access_key_id": keys.access_key_id, "secret_access_key": keys.secret_access_key}, handle)
    return keys


def read_keys(keys_file: Path) -> Keys | None:
    try:
        return Keys(**json.loads(keys_file.read_text()))
    except FileNotFoundError:
        return None


def save(endpoint: str, keys: Keys, bucket: str, folder: Path) -> int:
    """Every object of `bucket` into `folder` (by key), replacing what it held; returns how many."""
    s3 = client(endpoint, keys)
    fresh = folder.with_name(folder.name + ".saving")
    shutil.rmtree(fresh, ignore_errors=True)
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            target = fresh / item["Key"]
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, item["Key"], str(target))
            count += 1
    fresh.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    fresh.rename(folder)
    return count


def restore(endpoint: str, keys: Keys, bucket: str, folder: Path) -> int:
    """Upload what `save` kept in `folder` back into `bucket`; returns how many objects."""
    s3 = client(endpoint, keys)
    files = [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []
    for path in files:
        s3.upload_file(str(path), bucket, path.relative_to(folder).as_posix())
    return len(files)
