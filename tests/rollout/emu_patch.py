# emulate the engine's CUDA path on a CPU: graphs disabled (eager bucketed steps), no syncs
import torch, pytest
import rollout.engine as E
from rollout.cuda_graphs import DecodeGraphs, GraphConfig
torch.cuda.synchronize = lambda *a, **k: None
_init = E.Engine.__init__
def init(self, *a, **k):
    _init(self, *a, **k)
    self.cuda = True
    self.sync_every = 4
    self.graphs = DecodeGraphs(GraphConfig(enabled=False, fuse=False))
E.Engine.__init__ = init
