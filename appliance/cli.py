"""The `appliance` command: serve the gateway, manage client keys, and the admin tools."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import __version__
from appliance.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from appliance.catalog import Catalog
    from appliance.planner import PlanPolicy

Handler = Callable[[argparse.Namespace], int]


def fail(message: str, code: int = 1) -> int:
    print(f"appliance: {message}", file=sys.stderr)
    return code


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from appliance.app import create_app
    from appliance.governance import Governance, StoreError
    from appliance.log import event, setup_logging
    from appliance.server.files import max_client_connections, raise_open_files_limit
    from appliance.server.protocol import guarded_protocol

    if not 1 <= args.port <= 65535:
        return fail(f"--port {args.port} is not a TCP port (1-65535)", 2)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        return fail("--ssl-certfile and --ssl-keyfile go together")
    for tls_file in filter(None, (args.ssl_certfile, args.ssl_keyfile)):
        if not os.access(tls_file, os.R_OK):
            return fail(f"cannot read TLS file {tls_file}")
    settings = settings_from(args)
    setup_logging(settings.log_level)
    try:
        governance = Governance.open(settings)  # logs each bad line of a keys file it imports
    except StoreError as exc:
        return fail(str(exc), 2)
    if not governance.configured:
        problems = governance.store.import_problems
        bad = f"; {problems[0]}" if problems else ""
        return fail(
            "no client keys: set APPLIANCE_API_KEYS or create one with `appliance keys add NAME` "
            f"(keys file: {settings.resolved_keys_file}){bad}"
        )
    if (busy := cannot_listen(args.host, args.port)) is not None:
        return fail(busy)
    open_files = raise_open_files_limit()
    event("starting", host=args.host, port=args.port, cloud=settings.cloud_enabled, open_files=open_files)
    log_policies(settings)
    protocol = guarded_protocol(
        settings.max_header_bytes, settings.header_timeout, max_client_connections(open_files)
    )
    uvicorn.run(
        create_app(settings, governance),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http=protocol,  # httptools, with head limits, timeouts and OpenAI-shaped protocol errors
        log_config=None,
        access_log=False,
        # The gateway never uses the client's address, so X-Forwarded-* parsing is wasted work.
        proxy_headers=False,
        server_header=False,  # no "server: uvicorn" on every response: it tells clients nothing they need
        timeout_graceful_shutdown=10,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )
    return 0


def cannot_listen(host: str, port: int) -> str | None:
    """Why the gateway could not listen on host:port (in use, no such address), found before anything
    starts, so the admin gets one line instead of the server's shutdown after its start-up."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def log_policies(settings: Settings) -> None:
    """One line per public model name: what may leave the box, as the gateway understood the settings."""
    from appliance.catalog import load_catalog
    from appliance.log import event
    from appliance.policy import effective_policies

    for policy in effective_policies(settings, load_catalog()):
        event(
            "policy",
            model=policy.name,
            cloud_fallback=policy.cloud_fallback,
            leaves_box=policy.leaves_box,
            cloud_model=policy.cloud_model,
            detail=policy.reason,
        )


def cmd_governance(args: argparse.Namespace) -> int:
    from appliance.governance import StoreError
    from appliance.governance.commands import run

    try:
        return run(args, settings_from(args), fail)
    except StoreError as exc:
        return fail(str(exc), 2)


def cmd_doctor(args: argparse.Namespace) -> int:
    from appliance.doctor import Listening, exit_code, report, run_checks

    findings = run_checks(lambda: settings_from(args), Listening(args.host, args.ssl_certfile))
    print(report(findings, args.json))
    return exit_code(findings)


def cmd_gpu_check(args: argparse.Namespace) -> int:
    import json

    from appliance.catalog import load_catalog
    from appliance.gpu import Thresholds, health_report
    from appliance.planner import engines_min_driver

    required = round(args.require_memory * 1024) if args.require_memory else None
    thresholds = Thresholds(min_driver=engines_min_driver(load_catalog()))
    code, verdict = health_report(required_memory_mib=required, thresholds=thresholds)
    if args.json:
        print(json.dumps(verdict, indent=2))
        return code
    status, gpus = verdict["status"], verdict["gpus"]
    if status == "unavailable":
        return fail(f"no usable NVIDIA GPU: {verdict['reasons'][0]}", code)
    for gpu in gpus:
        total = (gpu.get("memory") or {}).get("total_mib")
        memory = "n/a" if total is None else f"{total} MiB"
        print(f"GPU {gpu['index']}: {gpu.get('name')}, {memory}, driver {gpu.get('driver_version') or 'n/a'}")
    for warning in verdict["warnings"]:
        print(f"warning: {warning}")
    for reason in verdict["reasons"]:
        print(f"unhealthy: {reason}")
    print(status)
    return code


def cmd_plan(args: argparse.Namespace) -> int:
    import json
    import math

    from appliance.catalog import load_catalog
    from appliance.planner import (
        MIB_PER_GIB,
        PlanPolicy,
        cpu_plan,
        env_file,
        plan,
        smallest_card_for_all_local,
    )

    bad = next((g for g in args.gpu_memory or () if not (math.isfinite(g) and g > 0)), None)
    if bad is not None:
        return fail(f"--gpu-memory {bad:g}: give the card's memory in GiB, more than 0", 2)
    if args.env_file and not Path(args.env_file).parent.is_dir():
        return fail(f"--env-file {args.env_file}: no such folder {Path(args.env_file).parent}", 2)
    settings = settings_from(args)
    catalog = load_catalog()
    global_policy = args.cloud_fallback or settings.cloud_fallback or "on_failure"
    policies = {
        name: args.cloud_fallback or policy
        for name, policy in settings.fallback_policies(catalog.routes).items()
    }
    found: tuple[list[int], str | None, str] | str
    if args.cpu:
        found = "--cpu"
    elif args.gpu_memory is not None:
        found = [round(g * MIB_PER_GIB) for g in args.gpu_memory], None, "given"
    else:
        found = detect_gpus()
    if isinstance(found, str):  # no usable GPU: the CPU plan, saying why
        source = found
        result = cpu_plan(catalog, PlanPolicy(cloud_fallback=policies), settings.cloud_enabled)
    else:
        cards, capability, source = found
        policy = PlanPolicy(cloud_fallback=policies, compute_capability=capability)
        if len(cards) > 1:
            return plan_several_gpus(args, catalog, cards, policy, source, global_policy)
        result = plan(catalog, cards[0], policy)
    if args.env_file:
        try:
            Path(args.env_file).write_text(env_file(result, global_policy))
        except OSError as exc:
            return fail(f"--env-file {args.env_file}: {exc.strerror or exc}", 2)
    smallest = (
        None
        if len(result.names("local")) == len(catalog.routes)
        else smallest_card_for_all_local(catalog, PlanPolicy(cloud_fallback=policies))
    )
    body = {**result.to_dict(), "memory_source": source, "cloud_fallback": policies}
    body["smallest_card_all_local_gib"] = smallest
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        print_plan(body)
    return 0


def detect_gpus() -> tuple[list[int], str | None, str] | str:
    """(memory MiB of every GPU, the lowest compute capability, where it came from), or why there is none."""
    from appliance.gpu import GpuUnavailable, collect_snapshots
    from appliance.planner import version_key

    try:
        gpus = collect_snapshots()
    except GpuUnavailable as exc:
        return f"no usable NVIDIA GPU: {exc}"
    sizes = [(gpu.get("memory") or {}).get("total_mib") for gpu in gpus]
    if not all(sizes):
        return "a GPU does not report its memory size"
    capabilities = [c for gpu in gpus if (c := gpu.get("compute_capability"))]
    capability = min(capabilities, key=version_key, default=None)
    names = ", ".join(f"GPU {gpu['index']}: {gpu.get('name')}" for gpu in gpus)
    return sizes, capability, names


def gpu_sizes(value: str) -> list[float]:
    """`--gpu-memory 24` or `--gpu-memory 24,24`: GiB per card."""
    try:
        return [float(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("give GiB per card, e.g. 24 or 24,24") from None


def plan_several_gpus(
    args: argparse.Namespace,
    catalog: Catalog,
    cards: list[int],
    policy: PlanPolicy,
    source: str,
    fallback: str,
) -> int:
    import json

    from appliance.planner_gpus import env_file_gpus, plan_gpus

    result = plan_gpus(catalog, cards, policy)
    if args.env_file:
        try:
            Path(args.env_file).write_text(env_file_gpus(result, fallback))
        except OSError as exc:
            return fail(f"--env-file {args.env_file}: {exc.strerror or exc}", 2)
    body = {**result.to_dict(), "memory_source": source}
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    print("GPUs: " + ", ".join(f"{i}: {mib} MiB" for i, mib in enumerate(cards)) + f" ({source})")
    for route in body["routes"]:
        print(f"  {route['placement']:<11} {route['name']}: {route['reason']}")
    speech = ", ".join(f"{s['kind']} ({s['model']}, {s['mib']} MiB)" for s in body["speech"]["engines"])
    print(f"speech on GPU {body['speech']['gpu']}: {speech or 'none'}")
    for engine in body["engines"]:
        gpus = ",".join(map(str, engine["gpus"]))
        print(f"{engine['service']} on GPU {gpus}: {engine['model']} " + " ".join(engine["args"]))
    print("the gateway pools: " + ", ".join(body["llm_urls"]))
    return 0


def print_plan(body: dict) -> None:
    mib = body["gpu_memory_mib"]
    if body["device"] == "cpu":
        print(f"no GPU: planning for the CPU ({body['memory_source']})")
    else:
        print(f"GPU memory: {mib} MiB ({mib / 1024:.1f} GiB, {body['memory_source']})")
    for route in body["routes"]:
        print(f"  {route['placement']:<11} {route['name']}: {route['reason']}")
    if body["stt"]:
        print(f"speech-to-text: fetch its model once with `appliance models pull {body['stt']['model']}`")
    print("start order: " + ", then ".join(f"{s['kind']} ({s['model']})" for s in body["start_order"]))
    if body["vllm"]:
        print(f"vLLM {body['vllm']['model']}: " + " ".join(body["vllm"]["args"]))
    if body["budget"]:
        print("memory budget:")
    for line in body["budget"]:
        print(f"  {line['mib']:>7} MiB  {line['item']}")
    if body["smallest_card_all_local_gib"]:
        print(f"everything runs locally from a {body['smallest_card_all_local_gib']} GiB card up")


def cmd_models(args: argparse.Namespace) -> int:
    from appliance import model_store
    from appliance.catalog import load_catalog

    settings, catalog = settings_from(args), load_catalog()
    try:
        if args.models_command == "pull":
            name = args.name or model_store.configured_stt_model(settings, catalog)
            target = model_store.pull_target(name, settings, catalog)
            print(f"{name}: downloading {target.repo} into {target.path}", flush=True)
            stored = model_store.pull(name, settings, catalog)
            print(f"{stored.name}: complete in {stored.path}")
            return 0
        if args.models_command == "verify":
            names = args.names or [model_store.configured_stt_model(settings, catalog)]
            return _verify_models(names, settings, catalog)
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
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    parser.add_argument("--config", help="YAML configuration file (default: $APPLIANCE_CONFIG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.set_defaults(group=parser, group_dest="command")

    serve = sub.add_parser("serve", help="run the OpenAI-compatible gateway")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8080, help="TCP port, 1-65535 (default: %(default)s)")
    serve.add_argument("--config", default=argparse.SUPPRESS, help="YAML configuration file")
    serve.add_argument("--ssl-certfile", help="serve HTTPS with this PEM certificate (chain)")
    serve.add_argument("--ssl-keyfile", help="the PEM private key of --ssl-certfile")
    serve.set_defaults(handler=cmd_serve)

    doctor = sub.add_parser(
        "doctor", help="check everything the gateway needs, one line each: exit 0 ok, 1 warnings, 2 failures"
    )
    doctor.add_argument("--json", action="store_true", help="print the checks as one JSON object")
    doctor.add_argument(
        "--host", default="127.0.0.1", help="the address serve listens on (default: %(default)s)"
    )
    doctor.add_argument("--ssl-certfile", help="the certificate serve is given, to check its expiry")
    doctor.set_defaults(handler=cmd_doctor)

    from appliance.governance.commands import add_parsers

    add_parsers(sub, cmd_governance)

    gpu = sub.add_parser("gpu", help="GPU health through NVML")
    gpu_sub = gpu.add_subparsers(dest="gpu_command", metavar="COMMAND")
    gpu.set_defaults(group=gpu, group_dest="gpu_command")
    check = gpu_sub.add_parser(
        "check", help="exit 0 healthy (warnings listed), 1 unhealthy, 2 no usable NVIDIA driver or GPU"
    )
    check.add_argument("--json", action="store_true", help="print the verdict as one JSON object")
    check.add_argument("--require-memory", type=float, metavar="GIB", help="fail below this much GPU memory")
    check.set_defaults(handler=cmd_gpu_check)

    plan = sub.add_parser(
        "plan", help="which models run on this GPU, which go to the cloud, vLLM's arguments"
    )
    plan.add_argument(
        "--gpu-memory", type=gpu_sizes, metavar="GIB[,GIB...]", help="plan for cards of these sizes"
    )
    plan.add_argument("--cpu", action="store_true", help="plan for this machine without its GPU")
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    plan.add_argument("--env-file", metavar="PATH", help="write what docker-compose.gpu.yml reads")
    plan.add_argument(
        "--cloud-fallback", choices=["never", "on_failure", "on_overload"], help="override the policy"
    )
    plan.set_defaults(handler=cmd_plan)

    models = sub.add_parser("models", help="the model store: download and check local models")
    models_sub = models.add_subparsers(dest="models_command", metavar="COMMAND")
    models.set_defaults(group=models, group_dest="models_command")
    models_sub.add_parser("list", help="catalog models this store can download, and their state")
    models_sub.add_parser("pull", help="download a catalog model once (resumable)").add_argument(
        "name", nargs="?", help="catalog name (default: the model the gateway would serve, as planned)"
    )
    models_sub.add_parser("verify", help="check that every file of a model is present").add_argument(
        "names", nargs="*", help="catalog names or model directories (default: the model the gateway serves)"
    )
    models.set_defaults(handler=cmd_models)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, args.group_dest) is None:  # a command group without its verb: show the group's help
        args.group.print_help(sys.stderr)
        return 2
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        return fail(str(exc), 2)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
