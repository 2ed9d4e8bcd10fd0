"""Fine-tune on your own prompt/completion data through the Python API.

    python examples/finetune_jsonl.py [--output runs/example]

Writes a small JSONL file of prompt/completion pairs (replace it with yours), trains the tiny
preset on it with loss only on the completions, and prints the summary. The same run from the CLI:

    fuyou train --config configs/tiny.yaml data.source=runs/example/data.jsonl train.steps=60
"""

import argparse
import json
import random
from pathlib import Path

from fuyou import TrainConfig, Trainer


def write_example_data(path: Path, num_examples: int = 400) -> None:
    rng = random.Random(0)
    with path.open("w") as file:
        for _ in range(num_examples):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
            file.write(json.dumps({"prompt": f"Sort the letters of {word}: ", "completion": "".join(sorted(word))}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("runs/example"))
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    data_path = args.output / "data.jsonl"
    write_example_data(data_path)
    config = TrainConfig.from_yaml("configs/tiny.yaml", [f"data.source={data_path}", "train.steps=60"])
    summary = Trainer(config, output_dir=args.output / "run", overwrite=True).train()
    print(summary.format())


if __name__ == "__main__":
    main()
