"""Run under torchrun (2 CPU processes, gloo): one trainer update on fixed groups with FSDP2;
rank 0 saves the full gradients for tests/test_train_loop.py to compare with one process.
Arguments: OUT RUN_DIR [ARCH] (qwen2, or llama: tied embeddings)."""
import os
import sys

import torch
import train_helpers as th

from nft_train.loop import Trainer


def main(out_path: str, run_dir: str, arch: str = "qwen2") -> None:
    model, tok = th.tiny_model(0, arch=arch)
    cfg = th.tiny_config(run_dir, train={"grad_clip": 0.0})
    trainer = Trainer(cfg, model=model, tokenizer=tok)
    trainer._update(th.fixed_groups(tok, n_groups=5))
    grads = th.grads_of(trainer.policy)
    if trainer.info.main:
        torch.save(grads, out_path)
    trainer.close()
    # Both ranks are done with every collective before the group goes (a rank leaving gloo
    # while the other still talks to it can abort at exit).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
    # Seen here about once in 20 runs: after all of the above, a rank aborted in the C++
    # teardown at interpreter exit ("terminate called without an active exception", no Python
    # frame left). The work and its output are complete by now: leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
