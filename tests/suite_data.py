"""Local stand-ins for the paper's 13 tasks: a few rows per split in each task's Hugging Face schema.

``write_suite_data(DIR)`` writes ``DIR/<lm-eval task>/<split>.jsonl`` as docs/evaluation.md describes,
so the suite runs offline through lm-eval's own task definitions.
"""

import json
from pathlib import Path


def _arc(i, q, texts, key):
    return {"id": f"q{i}", "question": q, "choices": {"text": texts, "label": ["A", "B", "C", "D"][: len(texts)]},
            "answerKey": key}


ARC = [_arc(0, "Which planet is closest to the Sun?", ["Mercury", "Mars", "Venus", "Earth"], "A"),
       _arc(1, "What is the capital of Peru?", ["Oslo", "Lima", "Rome", "Paris"], "B"),
       _arc(2, "What do plants need to make food?", ["salt", "sand", "sunlight", "snow"], "C"),
       _arc(3, "Which is a metal?", ["wood", "glass", "paper", "tin"], "D")]
OBQA = [{"id": r["id"], "question_stem": r["question"], "choices": r["choices"], "answerKey": r["answerKey"]}
        for r in ARC]
WSC = [{"text": "The trophy does not fit into the suitcase because it is too large.", "pronoun": "it",
        "pronoun_loc": 45, "quote": "it is too large", "quote_loc": 45, "options": ["the trophy", "the suitcase"],
        "label": 0, "source": "t"},
       {"text": "Anna gave Mia her book because she was kind.", "pronoun": "she", "pronoun_loc": 32,
        "quote": "she was kind", "quote_loc": 32, "options": ["Anna", "Mia"], "label": 0, "source": "t"}] * 2
WINOGRANDE = [{"sentence": "The cup fell off the table because _ was slippery.", "option1": "the cup",
               "option2": "the table", "answer": "1"},
              {"sentence": "Tin is a metal and oxygen is a gas, so _ is solid.", "option1": "tin",
               "option2": "oxygen", "answer": "1"},
              {"sentence": "Lima is in Peru, so _ is the city.", "option1": "Lima", "option2": "Peru", "answer": "1"}]
HELLASWAG = [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cuts an onion.", "ctx_b": "he",
              "ctx": "A man cuts an onion. he", "endings": ["puts it in a pan.", "flies away.", "sings.", "swims."],
              "source_id": "s", "split": "val", "split_type": "indomain", "label": "0"} for i in range(3)]
SQUAD = [{"id": f"s{i}", "title": "Peru", "context": "Lima is the capital of Peru. Peru is in South America.",
          "question": q, "answers": {"text": [a], "answer_start": [0]}}
         for i, (q, a) in enumerate([("What is the capital of Peru?", "Lima"), ("Where is Peru?", "South America"),
                                     ("Which country has Lima as capital?", "Peru"), ("What is Lima?", "the capital")])]
TRIVIA_QA = [("What is the capital of Peru", "Lima"), ("What is the symbol of tin", "Sn"),
             ("What is the capital of France", "Paris"), ("What gas do we breathe", "oxygen")]
TRIVIA = [{"question": q, "question_id": f"t{i}", "question_source": "x", "entity_pages": {}, "search_results": {},
           "answer": {"aliases": [a], "normalized_aliases": [a.lower()], "matched_wiki_entity_name": "",
                      "normalized_matched_wiki_entity_name": "", "normalized_value": a.lower(),
                      "type": "WikipediaEntity", "value": a}}
          for i, (q, a) in enumerate(TRIVIA_QA)]
DATA = {
    "lambada_openai": {"test": [{"text": "The capital of Peru is Lima"}, {"text": "Tin is a chemical element"}]},
    "boolq": {s: [{"question": "is lima the capital of peru", "passage": "Lima is the capital of Peru.", "idx": i,
                   "label": 1} for i in range(3)] for s in ("train", "validation")},
    "squad": {"train": SQUAD, "validation": SQUAD[:2]},
    "wsc273": {"test": WSC},
    "winogrande": {"train": WINOGRANDE * 4, "validation": WINOGRANDE[:2]},
    "hellaswag": {"train": HELLASWAG, "validation": HELLASWAG[:2]},
    "arc_easy": {"train": ARC, "validation": ARC, "test": ARC[:2]},
    "arc_challenge": {"train": ARC, "test": ARC[2:]},  # no validation file: that split is dropped
    "triviaqa": {"train": TRIVIA, "validation": TRIVIA[:2]},
    "piqa": {s: [{"goal": "To cut bread", "sol1": "use a knife", "sol2": "use a spoon", "label": 0}] * 3
             for s in ("train", "validation")},
    "openbookqa": {"train": OBQA * 3, "validation": OBQA, "test": OBQA[:2]},  # 10 shots
    "nq_open": {"train": [{"question": "capital of peru", "answer": ["Lima"]}] * 3,
                "validation": [{"question": "symbol of tin", "answer": ["Sn"]}] * 2},
}


def write_suite_data(folder: Path) -> Path:
    for task, splits in DATA.items():
        for split, rows in splits.items():
            path = folder / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder
