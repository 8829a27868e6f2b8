"""`lmforge <command> [--config file.yaml] [key.sub=value ...] [--key value ...]`: parse, load config, run. Thin.

Every command is a (config dataclass, run function) pair registered in COMMANDS; `--help` is generated from
the dataclass fields so the docs cannot drift from the code.
"""
from __future__ import annotations

import importlib
import sys
import textwrap
from dataclasses import dataclass

from .config import iter_help, load_config
from .core.errors import LMForgeError


@dataclass(frozen=True)
class Command:
    module: str          # module holding `Config` (a dataclass) and `run(config)`
    summary: str


COMMANDS: dict[str, Command] = {
    "quickstart": Command("lmforge.quickstart", "the whole chain on the embedded corpus in minutes, with a report"),
    "corpus": Command("lmforge.commands.corpus", "write the embedded synthetic bilingual corpus and its task sets"),
    "data": Command("lmforge.commands.data", "read, clean, dedup, mix, tokenize and pack a corpus into shards"),
    "tokenizer": Command("lmforge.commands.tokenizer", "train a tokenizer (byte-level BPE, BPE, Unigram, WordPiece)"),
    "pretrain": Command("lmforge.pretrain", "pretrain (or continue pretraining) a model on packed shards"),
    "finetune": Command("lmforge.finetune", "fine-tuning: full, freeze, bitfit, LoRA, QLoRA, DoRA, IA3, adapters, prefix/prompt/P-tuning"),
    "generate": Command("lmforge.commands.generate", "sample from a model: greedy/top-k/top-p, beam search, speculative, attention sinks"),
    "bench": Command("lmforge.commands.bench", "speed benchmarks vs baselines: `bench generate`, `bench serve`"),
    "chat": Command("lmforge.commands.chat", "chat with a model in the terminal (streaming, history, /reset, /exit)"),
    "serve": Command("lmforge.commands.serve", "OpenAI-compatible server: completions, chat, tools, embeddings, /metrics"),
    "eval": Command("lmforge.commands.eval", "evaluate models: perplexity, multiple choice, generative QA, pass@k, reports"),
    "arena": Command("lmforge.commands.arena", "pairwise battles judged by an LLM or humans; Elo / Bradley–Terry leaderboard"),
    "export": Command("lmforge.commands.export", "merge adapters into the base (--merge-adapter) and save a plain HF model"),
    "vocab": Command("lmforge.commands.vocab", "expand a model's vocabulary: add tokens, grow embeddings/head from sub-tokens"),
}


def _usage() -> str:
    rows = "\n".join(f"  {name:<11} {cmd.summary}" for name, cmd in COMMANDS.items())
    return (
        "usage: lmforge <command> [--config FILE.yaml] [key.sub=value ...] [--key value ...]\n\n"
        f"commands:\n{rows}\n\n"
        "`lmforge <command> --help` lists every config key with its default and meaning.\n"
        "Distributed: torchrun --nproc_per_node N -m lmforge pretrain ... train.parallel=ddp|fsdp"
    )


def _subcommand_usage(name: str, subcommands: dict, doc: str | None) -> str:
    """A command with SUBCOMMANDS (name -> (summary, loader giving (Config, run))) lists them."""
    rows = "\n".join(f"  {sub:<11} {summary}" for sub, (summary, _load) in subcommands.items())
    text = textwrap.dedent(doc).strip() + "\n\n" if doc else ""
    return (f"usage: lmforge {name} <subcommand> [--config FILE.yaml] [key=value ...]\n\n{text}"
            f"subcommands:\n{rows}\n\n`lmforge {name} <subcommand> --help` lists its config keys.")


def _command_help(name: str, config_cls: type, doc: str | None) -> str:
    lines = [f"usage: lmforge {name} [--config FILE.yaml] [key=value ...]", ""]
    if doc:
        lines += [textwrap.dedent(doc).strip(), ""]
    lines.append("config keys (set in YAML or as key=value / --key value):")
    for key, default, help_text in iter_help(config_cls):
        lines.append(f"  {key} = {default}")
        if help_text:
            lines.append(f"      {help_text}")
    return "\n".join(lines)


def _underscored(option: str) -> str:
    """`--merge-adapter` names the key merge_adapter (hyphens only in the name, never in the value)."""
    name, sep, value = option.partition("=")
    return name.replace("-", "_") + sep + value


def split_args(argv: list[str]) -> tuple[str | None, list[str], bool]:
    """(config path, dotted overrides, wants help) from `--config F`, `k=v`, `--k v`, `--k=v`, `--help`."""
    config_path, overrides, wants_help = None, [], False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            wants_help = True
        elif arg == "--config" or arg.startswith("--config="):
            if "=" in arg:
                config_path = arg.split("=", 1)[1]
            else:
                if i + 1 >= len(argv):
                    raise LMForgeError("--config needs a file path")
                config_path = argv[i + 1]
                i += 1
        elif arg.startswith("--"):
            key = _underscored(arg[2:])
            if "=" in key:
                overrides.append(key)
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append(f"{key}={argv[i + 1]}")
                i += 1
            else:
                overrides.append(f"{key}=true")
        elif "=" in arg:
            overrides.append(arg)
        else:
            raise LMForgeError(f"unexpected argument {arg!r}: use key=value or --key value")
        i += 1
    return config_path, overrides, wants_help


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"lmforge: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name].module)
    subcommands = getattr(module, "SUBCOMMANDS", None)
    if subcommands is not None:  # `lmforge <command> <subcommand> ...`
        if not rest or rest[0] not in subcommands:
            listing = _subcommand_usage(name, subcommands, module.__doc__)
            if not rest or rest[0] in ("-h", "--help", "help"):
                print(listing)
                return 0
            print(f"lmforge {name}: unknown subcommand {rest[0]!r}\n\n{listing}", file=sys.stderr)
            return 2
        name, (_summary, load) = f"{name} {rest[0]}", subcommands[rest[0]]
        rest = rest[1:]
        try:
            config_cls, run = load()
        except ImportError as e:
            print(f"lmforge {name}: unavailable: {e}", file=sys.stderr)
            return 2
        doc = importlib.import_module(config_cls.__module__).__doc__
    else:
        config_cls, run, doc = module.Config, module.run, module.__doc__
    try:
        config_path, overrides, wants_help = split_args(rest)
        if wants_help:
            print(_command_help(name, config_cls, doc))
            return 0
        cfg = load_config(config_cls, config_path, overrides)
        run(cfg)
    except LMForgeError as e:
        print(f"lmforge {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {name}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
