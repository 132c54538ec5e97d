"""Run under torchrun by test_rank_reading.py: each rank prepares the corpus (one builds, the other waits
on the lock) and reads its rows of a few global batches; it records the window starts it read."""

import json
import sys

from craftfn import data, distributed


class RecordingStream(data.TokenStream):
    """A token stream that notes the start of every window read from it."""

    def __init__(self, stream: data.TokenStream) -> None:
        super().__init__(stream.arrays, stream.ranges)
        self.read_starts: list[int] = []

    def gather(self, starts, length):
        self.read_starts += [int(s) for s in starts]
        return super().gather(starts, length)


def main(source: str, cache: str, out: str) -> None:
    distributed.init()
    corpus = data.prepare_corpus(source, "char", cache_dir=cache, progress=False, log=lambda s: None)
    train, _ = corpus.split(0.1, seed=0)
    stream = RecordingStream(train)
    windows = data.RandomWindows(stream, batch_size=8, block_size=16, seed=0, rank=distributed.rank(), world=distributed.world_size())
    batches = [windows[step]["input_ids"].tolist() for step in range(5)]
    with open(f"{out}.rank{distributed.rank()}.json", "w") as f:
        json.dump({"starts": stream.read_starts, "batches": batches}, f)
    distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
