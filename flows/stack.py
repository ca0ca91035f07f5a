"""`pivotmap stack up|down|status`: the production stack of infra/compose.yaml on one machine.

`up` starts, on 127.0.0.1 and in a state folder (default `~/.pivotmap/stack`, or `--dir`):

* PostgreSQL (Debian's server; cluster `DIR/postgres/pgdata`, kept across `down`/`up`) with the
  databases `prefect` and `mlflow`;
* an S3 endpoint (`moto_server`) with the bucket `mlflow` for MLflow's artifacts;
* `prefect server start` on PostgreSQL (asyncpg);
* `mlflow server` on PostgreSQL (psycopg), artifacts proxied to `s3://mlflow/artifacts`;
* `dask scheduler` and `--dask-workers` `dask worker` processes (one thread each);
* one `prefect worker start --type process` per work pool named in infra/prefect.yaml
  (`definitions.pools`; the worker creates its pool), running the checkout `--repo`;
* the crash detection of flows/alerts.py (a flow run whose heartbeats stop for `--crash-after`
  seconds, 90 by default, is set Crashed: a worker killed with its flow runs); the workers and
  stack.env send heartbeats every 30 s (PREFECT_FLOWS_HEARTBEAT_FREQUENCY);
* with PIVOTMAP_ALERT_WEBHOOK set, the alert automation of flows/alerts.py on that server.

It writes `DIR/stack.env` (`KEY=value` lines, mode 0600: PREFECT_API_URL, MLFLOW_TRACKING_URI,
MLFLOW_S3_ENDPOINT_URL, AWS_* for the S3 endpoint, PIVOTMAP_DASK_ADDRESS, ...) for the operator
(`set -a; . DIR/stack.env; set +a`) and `DIR/stack.json` (what runs, for `status` and `down`).
Ports are free ones unless given; a port in use or a service that fails to start ends `up` with
one line naming it, and everything already started is stopped. `down` stops every process the
stack started (process groups, the flow runs of its Prefect workers included) and PostgreSQL;
`--purge` also deletes the state folder and the databases.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pivotmap.flows.alerts import (
    CRASH_AFTER_SECONDS,
    HEARTBEAT_ENV,
    HEARTBEAT_SECONDS,
    WEBHOOK_ENV,
    AlertError,
    crash_detection_automation,
    install_crash_detection,
    webhook_url,
)
from pivotmap.flows.alerts import install as install_alerts
from pivotmap.tasks.stack_services import (
    ServiceRecord,
    StackError,
    StackPostgres,
    free_port,
    http_ok,
    port_in_use,
    remember_children,
    running,
    spawn,
    stop_services,
    wait_until,
)

DEFAULT_DIR = Path("~/.pivotmap/stack")
STATE, ENV_FILE = "stack.json", "stack.env"
MLFLOW_BUCKET = "mlflow"
# flag -> service, in the order services start
PORT_FLAGS = {
    "pg_port": "postgres", "s3_port": "s3", "prefect_port": "prefect-server",
    "mlflow_port": "mlflow", "dask_port": "dask-scheduler",
}  # fmt: skip


# the commands the stack runs, and what installs them
_COMMANDS = {
    "moto_server": "pip install -c requirements.lock 'moto[server]' (the S3 endpoint)",
    "prefect": "pip install -c requirements.lock -e .",
    "mlflow": "pip install -c requirements.lock -e .",
    "dask": "pip install -c requirements.lock -e .",
}


def _slug(name: str) -> str:
    """A file name for a log named after `name` (a work pool's name may hold any character)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _bin(name: str) -> str:
    """A console script of this environment (the venv's, beside the running Python)."""
    path = Path(sys.executable).with_name(name)
    return str(path) if path.is_file() else name


def default_repo() -> Path | None:
    """The checkout this package runs from, when it holds infra/prefect.yaml."""
    repo = Path(__file__).resolve().parents[1]
    return repo if (repo / "infra" / "prefect.yaml").is_file() else None


def work_pools(prefect_yaml: Path) -> list[str]:
    """The work pool names of a prefect.yaml (`definitions.pools`, else the deployments')."""
    import yaml

    doc = yaml.safe_load(prefect_yaml.read_text()) or {}
    pools = [p["name"] for p in (doc.get("definitions", {}).get("pools") or {}).values()]
    for deployment in doc.get("deployments") or []:
        name = (deployment.get("work_pool") or {}).get("name")
        if name and name not in pools:
            pools.append(name)
    return pools


def _read_state(folder: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads((folder / STATE).read_text()))
    except (OSError, ValueError):
        return None


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    tmp = folder / f".{STATE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(folder / STATE)


def _records(state: dict[str, Any]) -> list[ServiceRecord]:
    return [ServiceRecord(**s) for s in state.get("services", [])]


def _ports(args: argparse.Namespace) -> dict[str, int]:
    """Every service's port: the flag's, refused when in use, else a free one."""
    ports: dict[str, int] = {}
    for flag, service in PORT_FLAGS.items():
        port = getattr(args, flag)
        if port:
            if port_in_use(port):
                option = "--" + flag.replace("_", "-")
                raise StackError(
                    f"port {port} on 127.0.0.1 ({service}) is in use: give another with {option} "
                    "or leave it out for a free one"
                )
            ports[service] = port
    for service in PORT_FLAGS.values():
        while service not in ports:
            port = free_port()
            if port not in ports.values():
                ports[service] = port
    return ports


def _stack_env(ports: dict[str, int], secret: str, folder: Path) -> dict[str, str]:
    s3 = f"http://127.0.0.1:{ports['s3']}"
    return {
        "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect-server']}/api",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "MLFLOW_S3_ENDPOINT_URL": s3,
        "AWS_ENDPOINT_URL": s3,
        "AWS_ACCESS_KEY_ID": "pivotmap-stack",
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_DEFAULT_REGION": "us-east-1",
        "PIVOTMAP_DASK_ADDRESS": f"tcp://127.0.0.1:{ports['dask-scheduler']}",
        "PIVOTMAP_STACK_DIR": str(folder),
        # flow runs (workers' and the operator's) send heartbeats the crash detection expects
        HEARTBEAT_ENV: str(HEARTBEAT_SECONDS),
    }


def _write_env_file(path: Path, env: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(
            "# pivotmap stack: `set -a; . THIS_FILE; set +a` (written by `pivotmap stack up`)\n"
        )
        out.writelines(f"{k}={v}\n" for k, v in env.items())
    tmp.replace(path)


def read_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            env[key] = value
    return env


def _base_env() -> dict[str, str]:
    """This process's environment without Prefect/MLflow/AWS settings (the stack sets its own),
    the venv's scripts first on PATH."""
    drop = ("PREFECT_", "MLFLOW_", "AWS_", "DASK_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env["DO_NOT_TRACK"] = "true"
    return env


def up(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.dir).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    old = _read_state(folder)
    if old and (any(running(r) for r in _records(old)) or _pg_pid(old) is not None):
        raise StackError(
            f"a stack already runs in {folder}: `pivotmap stack status --dir {folder}`, or "
            f"`pivotmap stack down --dir {folder}` first"
        )
    repo = Path(args.repo).resolve() if args.repo else default_repo()
    if repo is not None and not (repo / "infra" / "prefect.yaml").is_file():
        raise StackError(
            f"--repo {repo} holds no infra/prefect.yaml: give the pivotmap checkout whose "
            "configs the Prefect workers run"
        )
    if args.pool:
        pools = list(dict.fromkeys(args.pool))
    elif repo is not None:
        pools = work_pools(repo / "infra" / "prefect.yaml")
    else:
        raise StackError(
            "no checkout with infra/prefect.yaml to read the work pools from: give --repo DIR "
            "or --pool NAME (repeat)"
        )
    if args.dask_workers < 1:
        raise StackError(f"--dask-workers {args.dask_workers}: give 1 or more")
    try:
        crash_detection_automation(args.crash_after)
    except AlertError as exc:
        raise StackError(f"--crash-after: {exc}") from exc
    alert_webhook = os.environ.get(WEBHOOK_ENV, "").strip()
    if alert_webhook:
        try:
            webhook_url(alert_webhook)
        except AlertError as exc:
            raise StackError(str(exc)) from exc
    for name, package in _COMMANDS.items():
        if shutil.which(_bin(name)) is None:
            raise StackError(f"{name} not found beside {sys.executable} or on PATH: {package}")
    ports = _ports(args)
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    env = _stack_env(ports, secrets.token_hex(16), folder)
    base = {**_base_env(), **env}
    pg_folder = Path((old or {}).get("postgres_folder") or folder / "postgres")
    pg = StackPostgres(pg_folder, ports["postgres"])
    state: dict[str, Any] = {
        "dir": str(folder), "repo": repo and str(repo), "env_file": str(folder / ENV_FILE),
        "postgres_folder": str(pg.folder), "postgres_bin": str(pg.bin), "ports": ports,
        "pools": pools, "services": [], "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "alerts": None, "crash_detection": None,
    }  # fmt: skip
    _write_state(folder, state)  # the postgres folder is known even if what follows fails
    records: list[ServiceRecord] = []

    def started(record: ServiceRecord, url: str = "", port: int = 0) -> ServiceRecord:
        record.url, record.port = url, port
        records.append(record)
        state["services"] = [r.to_dict() for r in records]
        _write_state(folder, state)
        return record

    begun = time.monotonic()
    try:
        pg.start()
        state["postgres_pid"] = pg.pid()
        pg.ensure_databases(["prefect", "mlflow"])
        _say(args, f"postgres  {pg.dsn('postgres')}  ({pg.folder})")

        s3 = started(
            spawn("s3", [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])],
                  base, folder / "s3", logs / "s3.log"),
            env["AWS_ENDPOINT_URL"], ports["s3"],
        )  # fmt: skip
        prefect_env = {
            **base,
            "PREFECT_HOME": str(folder / "prefect-home"),
            "PREFECT_API_DATABASE_CONNECTION_URL": pg.dsn("prefect", "asyncpg"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_API_URL": env["PREFECT_API_URL"],
            "PREFECT_UI_URL": env["PREFECT_API_URL"].removesuffix("/api"),  # links in alerts
        }
        server = started(
            spawn("prefect-server",
                  [_bin("prefect"), "server", "start", "--host", "127.0.0.1",
                   "--port", str(ports["prefect-server"])],
                  prefect_env, folder / "prefect-home", logs / "prefect-server.log"),
            env["PREFECT_API_URL"], ports["prefect-server"],
        )  # fmt: skip
        scheduler = started(
            spawn("dask-scheduler",
                  [_bin("dask"), "scheduler", "--host", "127.0.0.1",
                   "--port", str(ports["dask-scheduler"]), "--no-dashboard"],
                  {**base, "OMP_NUM_THREADS": "1"}, folder / "dask", logs / "dask-scheduler.log"),
            env["PIVOTMAP_DASK_ADDRESS"], ports["dask-scheduler"],
        )  # fmt: skip
        wait_until(s3, lambda: http_ok(f"{env['AWS_ENDPOINT_URL']}/moto-api/"), 60)
        _create_bucket(env, MLFLOW_BUCKET)
        mlflow = started(
            spawn("mlflow",
                  [_bin("mlflow"), "server", "--host", "127.0.0.1",
                   "--port", str(ports["mlflow"]), "--workers", "1",
                   "--backend-store-uri", pg.dsn("mlflow", "psycopg"),
                   "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts"],
                  # no GenAI job runner (10 huey consumers): pivotmap logs and registers models
                  {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                  folder / "mlflow", logs / "mlflow.log"),
            env["MLFLOW_TRACKING_URI"], ports["mlflow"],
        )  # fmt: skip
        _say(args, f"s3        {env['AWS_ENDPOINT_URL']}  (moto; bucket {MLFLOW_BUCKET})")
        wait_until(scheduler, lambda: port_in_use(ports["dask-scheduler"]), 90)
        for i in range(args.dask_workers):
            started(
                spawn(f"dask-worker-{i + 1}",
                      [_bin("dask"), "worker", env["PIVOTMAP_DASK_ADDRESS"], "--host", "127.0.0.1",
                       "--name", f"stack-worker-{i + 1}", "--nworkers", "1", "--nthreads", "1",
                       "--memory-limit", args.dask_memory, "--no-dashboard",
                       "--local-directory", str(folder / "dask" / f"worker-{i + 1}")],
                      {**base, "OMP_NUM_THREADS": "1"}, folder / "dask",
                      logs / f"dask-worker-{i + 1}.log"),
            )  # fmt: skip
        wait_until(server, lambda: http_ok(f"{env['PREFECT_API_URL']}/health"), 180)
        _say(args, f"prefect   {env['PREFECT_API_URL']}  (on PostgreSQL)")
        worker_env = {**base, "PREFECT_HOME": str(folder / "prefect-home")}
        if repo is not None:  # relative config paths of deployments resolve there
            worker_env["PIVOTMAP_REPO"] = str(repo)
        workers = [
            started(
                spawn(
                    f"prefect-worker-{pool}",
                    [
                        _bin("prefect"),
                        "worker",
                        "start",
                        "--pool",
                        pool,
                        "--type",
                        "process",
                        "--name",
                        f"stack-{_slug(pool)}",
                    ],
                    worker_env,
                    repo or folder / "workers",
                    logs / f"prefect-worker-{_slug(pool)}.log",
                ),
            )  # fmt: skip
            for pool in pools
        ]
        wait_until(mlflow, lambda: http_ok(f"{env['MLFLOW_TRACKING_URI']}/health"), 180)
        _say(args, f"mlflow    {env['MLFLOW_TRACKING_URI']}  (PostgreSQL, s3://{MLFLOW_BUCKET})")
        _wait_dask_workers(env["PIVOTMAP_DASK_ADDRESS"], args.dask_workers, scheduler, 120)
        _say(args, f"dask      {env['PIVOTMAP_DASK_ADDRESS']}  ({args.dask_workers} workers)")
        for pool, worker in zip(pools, workers, strict=True):
            wait_until(
                worker, functools.partial(_pool_has_worker, env["PREFECT_API_URL"], pool), 120,
                f"did not show online in work pool {pool!r}",
            )  # fmt: skip
        _say(args, f"workers   prefect pools {', '.join(pools)}")
        crash = install_crash_detection(env["PREFECT_API_URL"], args.crash_after)
        state["crash_detection"] = crash
        _say(args, f"crashes   runs silent for {args.crash_after:g} s are set Crashed")
        if alert_webhook:
            alert = install_alerts(alert_webhook, env["PREFECT_API_URL"])
            state["alerts"] = alert
            _say(args, f"alerts    failed deployed runs POSTed to {alert['webhook_host']}")
    except BaseException:
        stop_services(list(reversed(records)))
        pg.stop()
        state["services"] = []
        _write_state(folder, state)
        raise
    remember_children(records)
    state["services"] = [r.to_dict() for r in records]
    _write_state(folder, state)
    _write_env_file(folder / ENV_FILE, env)
    return {
        "ok": True, "dir": str(folder), "env_file": str(folder / ENV_FILE),
        "seconds": round(time.monotonic() - begun, 1), "pools": pools,
        "services": {r.name: r.url for r in records if r.url} | {"postgres": pg.dsn("postgres")},
        "alerts": state["alerts"], "crash_detection": state["crash_detection"],
    }  # fmt: skip


def _say(args: argparse.Namespace, line: str) -> None:
    if not args.json:
        print(f"  {line}", file=sys.stderr, flush=True)


def _create_bucket(env: dict[str, str], bucket: str) -> None:
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"],
    )  # fmt: skip
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        s3.create_bucket(Bucket=bucket)


def _wait_dask_workers(address: str, n: int, scheduler: ServiceRecord, timeout: float) -> None:
    from distributed import Client

    def ready() -> bool:
        with Client(address, timeout="5s", set_as_default=False) as client:
            return len(client.scheduler_info(n_workers=-1)["workers"]) >= n

    wait_until(scheduler, ready, timeout, f"did not see {n} dask workers")


def _pool_has_worker(api_url: str, pool: str) -> bool:
    from prefect.client.orchestration import SyncPrefectClient

    with SyncPrefectClient(api_url) as client:
        workers = client.read_workers_for_work_pool(pool)
    return any(str(w.status).upper().endswith("ONLINE") for w in workers)


def status(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.dir).expanduser().resolve()
    state = _read_state(folder)
    if state is None:
        return {"ok": False, "dir": str(folder), "running": False, "services": {}}
    services: dict[str, Any] = {}
    for record in _records(state):
        pids = running(record)
        services[record.name] = {
            "running": record.pid in pids, "pid": record.pid, "url": record.url,
            "log": record.log, "processes": len(pids),
        }  # fmt: skip
    pg_pid = _pg_pid(state)
    services["postgres"] = {"running": pg_pid is not None, "pid": pg_pid,
                            "url": f"postgresql://127.0.0.1:{state['ports']['postgres']}"}  # fmt: skip
    up_ = [s["running"] for s in services.values()]
    return {
        "ok": bool(up_) and all(up_), "dir": str(folder), "running": any(up_),
        "env_file": state.get("env_file"), "services": services,
    }  # fmt: skip


def _pg_pid(state: dict[str, Any]) -> int | None:
    from pivotmap.tasks.stack_services import _alive

    try:
        text = (Path(state["postgres_folder"]) / "pgdata" / "postmaster.pid").read_text()
        pid = int(text.split()[0])
    except (OSError, ValueError, IndexError, KeyError):
        return None
    return pid if _alive(pid) else None


def down(args: argparse.Namespace) -> dict[str, Any]:
    folder = Path(args.dir).expanduser().resolve()
    state = _read_state(folder)
    if state is None:
        raise StackError(f"no stack in {folder} (no {STATE}): nothing to stop")
    records = _records(state)
    begun = time.monotonic()
    killed: list[str] = []
    # the Prefect workers first (their flow runs with them: nothing reports to a stopped API),
    # then everything else together; PostgreSQL last
    workers = [r for r in records if r.name.startswith("prefect-worker-")]
    leaked = stop_services(workers, timeout=args.timeout, killed=killed)
    rest = [r for r in records if r not in workers]
    leaked += stop_services(rest, timeout=args.timeout, killed=killed)
    pg = StackPostgres(Path(state["postgres_folder"]), state["ports"]["postgres"])
    pg.stop()
    if leaked or pg.pid() is not None:
        raise StackError(f"processes still run after stopping the stack in {folder}: {leaked}")
    stopped = [r.name for r in records] + ["postgres"]
    state["services"] = []
    _write_state(folder, state)
    (folder / ENV_FILE).unlink(missing_ok=True)
    if args.purge:
        pg.remove()
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "ok": True, "dir": str(folder), "stopped": stopped, "purged": bool(args.purge),
        "killed": killed, "seconds": round(time.monotonic() - begun, 1),
    }  # fmt: skip


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (1-65535)")
    return port


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`stack` and its subcommands; `pivotmap stack` attaches the same to its subparser."""
    parser = parser or argparse.ArgumentParser(
        prog="pivotmap stack", description="The production stack on one machine (127.0.0.1)."
    )
    sub = parser.add_subparsers(dest="stack_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=str(DEFAULT_DIR),
                        help="state folder (logs, databases, stack.env); default %(default)s")  # fmt: skip
    common.add_argument("--json", action="store_true", help="one JSON summary on stdout")
    common.add_argument("--debug", action="store_true", help="also the failing service's log tail")
    p_up = sub.add_parser("up", parents=[common], help="start every service")
    for flag, service in PORT_FLAGS.items():
        p_up.add_argument("--" + flag.replace("_", "-"), type=_port, default=0, metavar="PORT",
                          help=f"{service} port (default: a free one)")  # fmt: skip
    p_up.add_argument("--dask-workers", type=int, default=2, metavar="N")
    p_up.add_argument("--dask-memory", default="0", metavar="SIZE",
                      help="memory limit per Dask worker (e.g. 4GiB; 0: none)")  # fmt: skip
    p_up.add_argument("--pool", action="append", metavar="NAME",
                      help="work pool to start a Prefect worker for (repeat; default: those of "
                      "infra/prefect.yaml)")  # fmt: skip
    p_up.add_argument("--crash-after", type=float, default=CRASH_AFTER_SECONDS,
                      metavar="SECONDS", help="a flow run without a heartbeat for this long is "
                      "set Crashed (default %(default)g; heartbeats every "
                      f"{HEARTBEAT_SECONDS} s)")  # fmt: skip
    p_up.add_argument("--repo", help="the checkout whose infra/prefect.yaml names the pools and "
                      "where relative config paths resolve (PIVOTMAP_REPO); default: this "
                      "package's checkout")  # fmt: skip
    sub.add_parser("status", parents=[common], help="what runs")
    p_down = sub.add_parser("down", parents=[common], help="stop everything the stack started")
    p_down.add_argument("--purge", action="store_true",
                        help="also delete the state folder and the databases")  # fmt: skip
    p_down.add_argument("--timeout", type=float, default=20, help="seconds before SIGKILL")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run a parsed `stack` command; prints a summary (or one JSON line) and returns the code."""
    commands = {"up": up, "down": down, "status": status}
    try:
        summary = commands[args.stack_command](args)
    except StackError as exc:
        first, _, rest = str(exc).partition("\n")
        print(f"pivotmap stack: error: {first}", file=sys.stderr)
        if rest and getattr(args, "debug", False):
            print(rest, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pivotmap stack: interrupted; what had started is stopped", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(summary))
    else:
        _print(args.stack_command, summary)
    return 0 if summary.get("ok") else 3


def _print(command: str, summary: dict[str, Any]) -> None:
    if command == "up":
        print(f"pivotmap stack: up in {summary['seconds']} s; environment: {summary['env_file']}")
        print(f"  set -a; . {summary['env_file']}; set +a")
    elif command == "down":
        print(f"pivotmap stack: stopped {', '.join(summary['stopped'])} in {summary['seconds']} s")
        if summary["killed"]:
            print(f"  killed after --timeout: {', '.join(summary['killed'])}")
    else:
        if not summary["services"]:
            print(f"pivotmap stack: no stack in {summary['dir']}")
            return
        for name, s in summary["services"].items():
            state = "running" if s["running"] else "stopped"
            print(f"  {name:<22} {state:<8} pid {s['pid'] or '-':<8} {s['url']}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
