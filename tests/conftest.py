import torch

# Pinned: a busy core slows an unpinned run many-fold.
torch.set_num_threads(1)
