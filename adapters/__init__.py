"""Framework adapters, each importing its framework only when imported itself.

- ``bestsave.adapters.torch.TorchCheckpointer``: plain PyTorch loops
- ``bestsave.adapters.lightning.BestCheckpoint``: PyTorch Lightning
- ``bestsave.adapters.fastai.SaveBestModelCallback``: fastai
- ``bestsave.adapters.keras.BestModelCheckpoint``: Keras 3
"""
