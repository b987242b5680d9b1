"""A W&B server stand-in on 127.0.0.1 for the real `wandb sweep` / `wandb agent` programs and the
runs they start: the GraphQL operations wandb 0.31.0 sends (read from its source: wandb/apis/public/
sweeps.py for the CLI and the agent, wandb-core's embedded queries for runs), the file_stream
endpoint and upload URLs. It hands out runs with W&B's own engine (`sweeps.next_run`, through
localsweep.engine's view of runs), requeues a preempted run under its id, and sends the agent the
commands a test asks for (stop a run). Every request is logged in `requests`; an operation it
does not know is answered with an error and kept in `unknown`, so a new wandb version shows what
it sends instead of hanging."""
import json
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml

from localsweep.common import import_engine, plain

ENTITY = "tester"
OPERATION = re.compile(r"\b(query|mutation)\s+(\w+)")


class Run:
    def __init__(self, run_id: str, sweep: str, params: dict):
        self.id, self.sweep, self.params = run_id, sweep, params
        self.state = "pending"  # W&B's run states: pending, running, finished, failed, preempted, ...
        self.handed_out = 1     # how many times the agent was told to run it
        self.stop_requested = False
        self.preempting = False
        self.exitcode = None
        self.history, self.summary, self.upserts = [], {}, 0
        self.ended_unheard = False  # the agent stopped reporting it without the run telling us how it ended


class StandIn:
    def __init__(self):
        self.lock = threading.Lock()
        self.sweeps, self.runs, self.agents = {}, {}, {}
        self.requests, self.unknown, self.uploads = [], [], {}
        # {run index (1-based, in hand-out order): predicate(run)}: stop that run once the agent
        # reports it running and the predicate holds (the run has got far enough to be stopped)
        self.stop_when = {}
        self.handed_out = []            # run ids, in the order first handed out
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    # --- the sweep: what the real server decides -------------------------------------------------

    def _next_command(self, sweep_id: str, running: set) -> list[dict]:
        """The agent's next commands: stop a run the test asked to stop; else, when the agent runs
        nothing, a preempted run again under its id, or the engine's next run; else nothing."""
        sweep = self.sweeps[sweep_id]
        for run_id in running:
            run = self.runs.get(run_id)
            ready = self.stop_when.get(self.handed_out.index(run_id) + 1) if run else None
            if run and (run.stop_requested or (ready is not None and ready(run))):
                run.stop_requested = True  # as W&B's server: the run is marked stopped, then the agent told
                return [{"type": "stop", "run_id": run_id}]
        if running or sweep["state"] != "RUNNING":
            return []
        for run in self.runs.values():
            if run.sweep == sweep_id and run.state == "preempted":
                run.state, run.handed_out = "pending", run.handed_out + 1
                return [self._run_command(sweep, run)]
        engine = import_engine()
        known = [engine.SweepRun(name=r.id, state=r.state if r.state in engine.RunState.__members__ else "failed",
                                 config={k: {"value": v} for k, v in r.params.items()}, summary_metrics=r.summary)
                 for r in self.runs.values() if r.sweep == sweep_id]
        suggestion = engine.next_run(sweep["config"], known, validate=True)
        if suggestion is None:
            sweep["state"] = "FINISHED"
            return [{"type": "exit"}]
        run = Run(secrets.token_hex(4), sweep_id, plain({k: v["value"] for k, v in suggestion.config.items()}))
        self.runs[run.id] = run
        self.handed_out.append(run.id)
        return [self._run_command(sweep, run)]

    def _run_command(self, sweep: dict, run: Run) -> dict:
        return {"type": "run", "run_id": run.id, "program": sweep["config"].get("program"),
                "args": {k: {"value": v} for k, v in run.params.items()}}

    def run_ended(self, run: Run, exitcode: int) -> None:
        """W&B's state for an ended run: preempted (requeued) when it was marked preempting and
        failed; else finished on exit 0, failed otherwise."""
        run.exitcode = exitcode
        if exitcode != 0 and run.preempting:
            run.state = "preempted"
        else:
            run.state = "finished" if exitcode == 0 else "failed"

    # --- GraphQL ---------------------------------------------------------------------------------

    def graphql(self, body: dict) -> dict:
        query, variables = body.get("query", ""), body.get("variables") or {}
        match = OPERATION.search(query)
        name = match.group(2) if match else query.strip().split("{", 2)[1].strip().split("(")[0].split()[0]
        handler = getattr(self, f"op_{name}", None)
        with self.lock:
            self.requests.append(("graphql", name, variables))
            if handler is None:
                self.unknown.append((name, query[:400]))
                return {"errors": [{"message": f"stand-in: unknown operation {name}"}], "data": None}
            return {"data": handler(variables)}

    def op_Viewer(self, v):
        return {"viewer": {"id": "VXNlcjox", "entity": ENTITY, "username": ENTITY, "email": "t@example.com",
                           "flags": "{}", "admin": False, "teams": {"edges": []}}}

    def op_ServerFeaturesQuery(self, v):
        return {"serverInfo": {"features": []}}

    def op_UpsertSweep(self, v):
        sweep_id = secrets.token_hex(4)
        project = v.get("projectName") or "uncategorized"
        self.sweeps[sweep_id] = {"config": yaml.safe_load(v["config"]), "config_yaml": v["config"],
                                 "project": project, "entity": v.get("entityName") or ENTITY, "state": "RUNNING"}
        return {"upsertSweep": {"sweep": {"name": sweep_id, "project": self._project(project)},
                                "configValidationWarnings": []}}

    def _project(self, name):
        return {"id": "UHJvamVjdDox", "name": name, "entity": {"id": "RW50aXR5OjE=", "name": ENTITY}}

    def op_SweepWithRuns(self, v):
        sweep = self.sweeps.get(v["sweep"])
        if sweep is None:
            return {"project": {"sweep": None}}
        runs = [{"name": r.id, "state": r.state, "config": json.dumps({k: {"value": x} for k, x in r.params.items()}),
                 "exitcode": r.exitcode, "heartbeatAt": None, "shouldStop": r.stop_requested, "failed": r.state == "failed",
                 "stopped": r.stop_requested, "running": r.state == "running", "summaryMetrics": json.dumps(r.summary),
                 "sampledHistory": []} for r in self.runs.values() if r.sweep == v["sweep"]]
        return {"project": {"sweep": {
            "id": "U3dlZXA6MQ==", "name": v["sweep"], "method": sweep["config"].get("method"), "state": sweep["state"],
            "description": None, "config": sweep["config_yaml"], "createdAt": "2026-01-01T00:00:00",
            "heartbeatAt": None, "updatedAt": None, "earlyStopJobRunning": False, "bestLoss": None,
            "controller": None, "scheduler": None, "runs": {"edges": [{"node": r} for r in runs]}}}}

    def op_CreateAgent(self, v):
        agent_id = f"agent-{len(self.agents) + 1}"
        self.agents[agent_id] = {"sweep": v["sweep"], "heartbeats": 0}
        return {"createAgent": {"agent": {"id": agent_id}}}

    def op_Heartbeat(self, v):
        agent = self.agents[v["id"]]
        agent["heartbeats"] += 1
        running = set(json.loads(v.get("runState") or "{}"))
        for run in self.runs.values():  # handed out earlier, no longer reported: it has ended
            if run.sweep == agent["sweep"] and run.state in ("pending", "running") and run.id not in running:
                # an offline child tells the server nothing: W&B would call it crashed
                run.state, run.ended_unheard = "crashed", True
        commands = self._next_command(agent["sweep"], running)
        return {"agentHeartbeat": {"agent": {"id": v["id"]}, "commands": json.dumps(commands)}}

    # a run's own operations (wandb-core)
    def op_UpsertBucket(self, v):
        run = self.runs.get(v.get("name"))
        if run is not None:
            run.upserts += 1
            if run.state == "pending":
                run.state = "running"
        project = v.get("project") or "uncategorized"
        return {"upsertBucket": {"bucket": {
            "id": f"UnVuOj{v.get('name')}", "name": v.get("name"), "displayName": v.get("displayName"),
            "description": None, "config": v.get("config") or "{}", "sweepName": v.get("sweep"),
            "project": self._project(project), "historyLineCount": 0}, "inserted": run is None or run.upserts == 1}}

    def op_RunResumeStatus(self, v):
        return {"model": {"id": "UHJvamVjdDox", "name": v.get("project"), "entity": {"id": "RW50aXR5OjE=", "name": ENTITY},
                          "bucket": None}}

    def op_CreateRunFiles(self, v):
        return {"createRunFiles": {"runID": f"UnVuOj{v['run']}", "uploadHeaders": [], "files": [
            {"name": name, "uploadUrl": f"{self.url}/upload/{v['run']}/{name}"} for name in v["files"]]}}

    def op_OrganizationCoreWeaveOrganizationID(self, v):
        return {"entity": {"organization": None}}

    def op_RunStoppedStatus(self, v):  # train.py asks it after a SIGTERM under the agent
        run = self.runs.get(v["runId"])
        return {"project": {"run": None if run is None else {"stopped": run.stop_requested}}}

    def op_RunState(self, v):
        run = self.runs.get(v["run"])
        return {"project": {"run": {"id": f"UnVuOj{v['run']}", "state": run.state if run else "running"}}}

    # --- file_stream and uploads -------------------------------------------------------------------

    def file_stream(self, run_id: str, body: dict) -> dict:
        with self.lock:
            self.requests.append(("file_stream", run_id, {k: v for k, v in body.items() if k != "files"}))
            run = self.runs.get(run_id)
            if run is None:
                return {}
            for name, chunk in (body.get("files") or {}).items():
                for line in chunk.get("content") or []:
                    if name == "wandb-history.jsonl":
                        run.history.append(json.loads(line))
                    elif name == "wandb-summary.json":
                        run.summary = json.loads(line)
            if body.get("preempting"):
                run.preempting = True
            if body.get("complete"):
                self.run_ended(run, body.get("exitcode", 0))
            return {"exitcode": None, "limits": {}, "stopped": run.stop_requested}

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the requests are in standin.requests
                pass

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _reply(self, payload: dict, status: int = 200):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = self._body()
                if self.path.startswith("/graphql"):
                    return self._reply(standin.graphql(json.loads(body or b"{}")))
                if self.path.startswith("/sdk/otel/"):  # wandb-core's own telemetry
                    return self._reply({})
                match = re.match(r"/files/[^/]+/[^/]+/([^/]+)/file_stream", self.path)
                if match:
                    return self._reply(standin.file_stream(match.group(1), json.loads(body or b"{}")))
                with standin.lock:
                    standin.unknown.append(("POST", self.path))
                return self._reply({"error": "unknown"}, 404)

            def do_PUT(self):
                body = self._body()
                with standin.lock:
                    standin.uploads[self.path] = len(body)
                return self._reply({})

            def do_GET(self):
                with standin.lock:
                    standin.unknown.append(("GET", self.path))
                return self._reply({"error": "unknown"}, 404)

        return Handler
