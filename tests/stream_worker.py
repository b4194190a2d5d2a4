"""Run under `accelerate launch` (tests/test_streaming.py): every process streams one epoch of the shard folder
argv[1] with two DataLoader workers, and the main process writes each process's row keys, in order, to argv[2]."""

import json
import sys

from accelerate import Accelerator
from accelerate.utils import gather_object

from loop.config.loading import load_config
from loop.data.shards import read_index
from loop.data.streaming import StreamSource, stream_loader


def main() -> None:
    folder, output = sys.argv[1], sys.argv[2]
    accelerator = Accelerator(cpu=True)
    config = load_config("quickstart", ["--data.shuffle_buffer=10", "--train.dataloader_num_workers=2",
                                        "--train.per_device_train_batch_size=4"], None)
    loader = stream_loader(config, (StreamSource("train", read_index(f"{folder}/train"), 1.0),), 0, accelerator)
    keys, batches = [], iter(loader)
    for batch in batches:
        keys += batch["index"].tolist()
        if loader.position.epoch == 1:  # that was the epoch's last batch on this process
            break
    batches.close()  # its DataLoader's workers stop now, not at interpreter exit
    gathered = gather_object([keys])
    if accelerator.is_main_process:
        with open(output, "w", encoding="utf-8") as file:
            json.dump(gathered, file)
    accelerator.end_training()  # the process group is destroyed before exit, as a training run's is


if __name__ == "__main__":
    main()
