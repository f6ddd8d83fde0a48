"""The stack's S3 API on loopback: moto's server with its access checks on (docs/design.md §8).

    python -m cdm.platform.stack.s3_server --host 127.0.0.1 --port P --keys-out .cdm/stack/s3-keys.json

moto answers anyone unless `INITIAL_NO_AUTH_ACTION_COUNT` is set; then, after that many unauthenticated actions,
every request must be signed (SigV4) by an IAM access key that exists and whose policy allows the action. This
process spends those actions itself, before it listens: in-process (moto's `mock_aws`, which shares the server's
state) it creates one IAM user with an allow-all policy and one access key, and writes the key to `--keys-out`
(0600, in one step) for `cdm stack` to hand to its clients. Nobody else ever gets an unauthenticated action.

moto's own control endpoints (`/moto-api/...`: reset the store, or turn the access checks off) answer anyone,
so they are refused here, for every host name. A self-check makes the process exit (1) instead of serving if an
unsigned request would be accepted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

BOOTSTRAP_ACTIONS = 3  # create_user, put_user_policy, create_access_key: the only unauthenticated actions
USER = "cdm-stack"
POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def guarded(app):
    """The WSGI app minus moto's control endpoints (reset, reset-auth, seed, recorder, dashboard) and minus
    unsigned requests (403 at once; signed ones go on to moto's own checks)."""
    def serve(environ, start_response):
        host = environ.get("HTTP_HOST", "")
        signed = "HTTP_AUTHORIZATION" in environ or "X-Amz-Signature" in environ.get("QUERY_STRING", "")
        if environ.get("PATH_INFO", "").startswith("/moto-api") or host.startswith("motoapi.") or not signed:
            # (An unsigned request would reach moto's checks without the header they read, and fail with 500.)
            body = b"<Error><Code>AccessDenied</Code><Message>not served</Message></Error>"
            start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    return serve


def bootstrap() -> dict[str, str]:
    """The stack's IAM user and access key, made in-process with moto's own (unauthenticated) first actions."""
    import boto3
    from moto import mock_aws

    mock = mock_aws()
    mock.start()
    try:
        iam = boto3.client("iam", region_name="us-east-1", aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap")
        iam.create_user(UserName=USER)
        iam.put_user_policy(UserName=USER, PolicyName="cdm-stack", PolicyDocument=json.dumps(POLICY))
        key = iam.create_access_key(UserName=USER)["AccessKey"]
        # The self-check: an unsigned-for-this-store request must be refused from here on.
        stranger = boto3.client("s3", region_name="us-east-1", aws_access_key_id="AKIASTRANGER",
                                aws_secret_access_key="wrong")
        try:
            stranger.list_buckets()
        except Exception:  # noqa: BLE001 - refused (InvalidAccessKeyId / AccessDenied): what must happen
            pass
        else:
            raise SystemExit("s3: moto accepted an unknown access key; refusing to serve")
    finally:
        mock.stop(remove_data=False)  # keep the user and key: the server below shares this state
    return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keys-out", type=Path, required=True, help="where the access key is written (0600)")
    args = parser.parse_args(argv)
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = str(BOOTSTRAP_ACTIONS)  # read by moto at import
    os.environ.setdefault("MOTO_PORT", str(args.port))
    from werkzeug.serving import run_simple

    from moto.server import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

    from cdm.platform.workspace.fileio import atomic_write

    keys = bootstrap()
    os.umask(0o077)
    atomic_write(args.keys_out, json.dumps(keys))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(args.host, args.port, guarded(app), threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    sys.exit(main())
