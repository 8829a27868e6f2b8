"""Evaluation: the yardstick every other stage is measured with.

```python
from lmforge.eval import loglikelihood, score_multiple_choice, load_mc_task, perplexity_of_files
task = load_mc_task("data/mmlu", split="test", dev_split="dev")
result = score_multiple_choice(model, tok, task.questions, task.dev, num_shots=5)   # result.metrics["acc"]
ppl = perplexity_of_files(model, tok, ["val.jsonl"], max_length=512, stride=256)   # ppl.bits_per_byte
exact_match("The Paris.", "paris"); token_f1(pred, refs); bleu(preds, refs); rouge_l(preds, refs)
run_python(solution, tests).status                                                  # for pass_at_k(n, c, k)
```
"""
from .loglik import LogLikelihood, encode_pair, loglikelihood, score_token_requests
from .metrics import (answer_tokens, bleu, exact_match, has_cjk, mean_pass_at_k, normalize_answer, pass_at_k,
                      rouge_l, token_f1)
from .multiple_choice import (MCPrediction, MCResult, build_context, format_question, pick_exemplars,
                              score_multiple_choice, summarize)
from .perplexity import (PerplexityResult, perplexity_of_files, perplexity_of_shards, perplexity_of_texts,
                         sliding_windows, stream_nll)
from .sandbox import SandboxLimits, SandboxResult, network_namespace_available, run_python
from .tasks import (MCQuestion, MCTask, find_split_files, load_mc_split, load_mc_task, questions_from_records,
                    read_mc_csv, read_mc_file, read_mc_jsonl)

__all__ = [
    "LogLikelihood", "loglikelihood", "encode_pair", "score_token_requests",
    "exact_match", "token_f1", "normalize_answer", "answer_tokens", "has_cjk", "bleu", "rouge_l",
    "pass_at_k", "mean_pass_at_k",
    "MCPrediction", "MCResult", "score_multiple_choice", "summarize", "build_context", "format_question",
    "pick_exemplars",
    "PerplexityResult", "perplexity_of_texts", "perplexity_of_files", "perplexity_of_shards", "sliding_windows",
    "stream_nll",
    "SandboxLimits", "SandboxResult", "run_python", "network_namespace_available",
    "MCQuestion", "MCTask", "load_mc_task", "load_mc_split", "find_split_files", "read_mc_csv", "read_mc_jsonl",
    "read_mc_file", "questions_from_records",
]

# The harness: models x tasks -> results.json + reports (lmforge eval).
from .contamination import check_contamination, ngram_hashes  # noqa: E402
from .generative import (GenItem, evaluate_generative, extract_choice, read_gen_jsonl,  # noqa: E402
                         score_predictions)
from .harness import evaluate, load_model  # noqa: E402
from .report import write_reports  # noqa: E402
from .robustness import add_typos, perturb_gen, perturb_mc, summarize_robustness  # noqa: E402
from .suite import ModelSpec, TaskSpec  # noqa: E402

__all__ += [
    "evaluate", "load_model", "ModelSpec", "TaskSpec", "write_reports",
    "GenItem", "read_gen_jsonl", "evaluate_generative", "score_predictions", "extract_choice",
    "perturb_mc", "perturb_gen", "add_typos", "summarize_robustness", "check_contamination", "ngram_hashes",
]

# The arena: pairwise battles, LLM judge / human votes, Elo and Bradley–Terry leaderboards. (The lm-eval
# adapter, lmforge.eval.lm_eval_adapter, is imported on demand: it needs the optional lm-eval package.)
from .arena import ArenaConfig, ArenaModel, ArenaResult, read_prompts, run_arena, schedule_battles  # noqa: E402
from .arena_judge import JudgeConfig, LLMJudge, parse_verdict, read_human_votes  # noqa: E402
from .arena_ratings import (Battle, Leaderboard, bootstrap_ratings, bt_ratings, confidence_intervals,  # noqa: E402
                            elo_ratings, leaderboard)

__all__ += [
    "ArenaConfig", "ArenaModel", "ArenaResult", "run_arena", "read_prompts", "schedule_battles",
    "JudgeConfig", "LLMJudge", "parse_verdict", "read_human_votes",
    "Battle", "Leaderboard", "elo_ratings", "bt_ratings", "bootstrap_ratings", "confidence_intervals", "leaderboard",
]
