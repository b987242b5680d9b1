"""The W&B agent's contract: the params file it writes and the `command:` macros it expands."""
import json
import os
import re

import yaml

DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
ENVVAR_MACRO = re.compile(r"\$\{envvar\:([A-Z0-9_]*)\}")  # as wandb's agent: ${envvar:NAME}


def sweep_command_args(params: dict) -> dict:
    """The argument forms wandb's agent offers as macros, from {name: value}; mirrors
    wandb.sdk.launch.sweeps.utils.create_sweep_command_args (a test holds them equal)."""
    flags, no_hyphens, no_booleans, no_equals, append_hydra, override_hydra = [], [], [], [], [], []
    for name, value in params.items():
        flag = f"{name}={value}"
        flags.append("--" + flag)
        no_hyphens.append(flag)
        no_equals += [f"--{name}", str(value)]
        append_hydra.append("+" + flag)
        override_hydra.append("++" + flag)
        if isinstance(value, bool):
            if value:
                no_booleans.append("--" + name)
        else:
            no_booleans.append("--" + flag)
    return {
        "args": flags, "args_no_equals": no_equals, "args_no_hyphens": no_hyphens,
        "args_no_boolean_flags": no_booleans, "args_json": [json.dumps(dict(params))],
        "args_append_hydra": append_hydra, "args_override_hydra": override_hydra,
    }


def expand_command(command: list | None, params: dict, *, program: str, interpreter: str,
                   args_json_file: str, environ: dict | None = None) -> list[str]:
    """The command line wandb's agent would run: `${envvar:NAME}` replaced inside any item, and
    an item that is exactly `${macro}` replaced by that macro's list (an unknown one by nothing)."""
    environ = os.environ if environ is None else environ
    items = []
    for item in list(command or DEFAULT_COMMAND):
        if isinstance(item, str):
            for match in list(ENVVAR_MACRO.finditer(item))[::-1]:
                item = item[:match.start()] + environ.get(match.group(1), match.group(1)) + item[match.end():]
        items.append(item)
    macros = sweep_command_args(params)
    macros.update({"interpreter": [interpreter], "program": [program], "args_json_file": [args_json_file]})
    if os.name != "nt":
        macros["env"] = ["/usr/bin/env"]
    expanded = []
    for item in items:
        item = str(item)
        if item.startswith("${") and item.endswith("}"):
            expanded += macros.get(item[2:-1]) or []
        else:
            expanded.append(item)
    return expanded


def params_file_text(params: dict) -> str:
    """What wandb's agent writes to WANDB_SWEEP_PARAM_PATH (wandb.sdk.lib.config_util.
    save_config_file_from_dict of the run's {name: {"value": v}}), byte for byte."""
    text = b"wandb_version: 1"
    if params:
        text += b"\n\n" + yaml.dump({k: {"value": v} for k, v in params.items()}, Dumper=yaml.SafeDumper,
                                    default_flow_style=False, allow_unicode=True, encoding="utf-8",
                                    sort_keys=False)
    return text.decode("utf-8")
