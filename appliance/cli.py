"""The `appliance` command: serve the gateway, manage client keys, and the admin tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from appliance.config import ConfigError, Settings, load_settings

Handler = Callable[[argparse.Namespace], int]


def fail(message: str, code: int = 1) -> int:
    print(f"appliance: {message}", file=sys.stderr)
    return code


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from appliance.app import create_app
    from appliance.auth import KeyStore
    from appliance.log import event, setup_logging

    settings = settings_from(args)
    try:
        keys = KeyStore(settings.client_keys, settings.resolved_keys_file)
    except ValueError as exc:
        return fail(f"bad keys file: {exc}")
    if not keys.configured:
        return fail(
            "no client keys: set APPLIANCE_API_KEYS or create one with `appliance keys add NAME` "
            f"(keys file: {settings.resolved_keys_file})"
        )
    setup_logging(settings.log_level)
    event("starting", host=args.host, port=args.port, cloud=settings.cloud_enabled)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
    )
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from appliance.auth import hash_key, new_key, read_keys_file, write_keys_file

    path = settings_from(args).resolved_keys_file
    keys = read_keys_file(path) if path.exists() else {}
    if args.keys_command == "list":
        for key_id in sorted(keys):
            print(key_id)
        return 0
    if args.keys_command == "add":
        if args.name in keys:
            return fail(f"key '{args.name}' exists; remove it first to rotate it")
        key = new_key()
        keys[args.name] = hash_key(key)
        write_keys_file(path, keys)
        print(key)  # shown once: only its hash is stored
        return 0
    if args.name not in keys:  # remove
        return fail(f"no key named '{args.name}'")
    del keys[args.name]
    write_keys_file(path, keys)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from appliance import model_store
    from appliance.catalog import load_catalog

    settings, catalog = settings_from(args), load_catalog()
    try:
        if args.models_command == "pull":
            target = model_store.pull_target(args.name, settings, catalog)
            print(f"{args.name}: downloading {target.repo} into {target.path}", flush=True)
            stored = model_store.pull(args.name, settings, catalog)
            print(f"{stored.name}: complete in {stored.path}")
            return 0
        if args.models_command == "verify":
            return _verify_models(args.names or [settings.stt_model], settings, catalog)
    except model_store.ModelStoreError as exc:
        return fail(str(exc))
    for name, model in sorted(model_store.downloadable_models(catalog).items()):  # list
        path = settings.models_dir / name
        if not path.exists():
            state = "not installed"
        elif model_store.missing_files(path):
            state = "incomplete"
        else:
            state = f"installed, {model_store.disk_size(path) / 1e9:.2f} GB"
        print(f"{name}\t{model.kind}\t{model.params['repo']}\t{state}\t{path}")
    return 0


def _verify_models(names: list[str], settings: Settings, catalog: object) -> int:
    from appliance import model_store

    failed = 0
    for name in names:
        try:
            stored = model_store.resolve(name, settings, catalog)
            print(f"ok {stored.name} ({stored.path})")
        except model_store.ModelStoreError as exc:
            print(f"appliance: {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    parser.add_argument("--config", help="YAML configuration file (default: $APPLIANCE_CONFIG)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the OpenAI-compatible gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--config", default=argparse.SUPPRESS, help="YAML configuration file")
    serve.set_defaults(handler=cmd_serve)

    keys = sub.add_parser("keys", help="manage client API keys (only their hashes are stored)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    keys_sub.add_parser("list", help="list key ids")
    keys_sub.add_parser("add", help="create a key and print it once").add_argument("name")
    keys_sub.add_parser("remove", help="revoke a key").add_argument("name")
    keys.set_defaults(handler=cmd_keys)

    models = sub.add_parser("models", help="the model store: download and check local models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="catalog models this store can download, and their state")
    models_sub.add_parser("pull", help="download a catalog model once (resumable)").add_argument("name")
    models_sub.add_parser("verify", help="check that every file of a model is present").add_argument(
        "names", nargs="*", help="catalog names or model directories (default: $APPLIANCE_STT_MODEL)"
    )
    models.set_defaults(handler=cmd_models)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        return fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
