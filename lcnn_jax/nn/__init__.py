"""Flax linen building blocks and models (see ``layers`` for the plug-in convention); your own
``flax.linen.Module`` joins them with :func:`register_model` or an import path as ``config.model.name``."""
from lcnn_jax.nn import conv
from lcnn_jax.nn.layers import (ACTIVATIONS, NORMS, POOLS, Activation, BatchNorm, Conv, Dense, Identity,
                                ModuleFactory, activation, normalization, pool2d, resolve_activation,
                                resolve_norm, softplus_beta)
from lcnn_jax.nn.lcnn import (LCNN_LAYERS, CenteredSoftplus, LCNNBasicBlock, LipschitzBatchNorm, SpectralConv,
                              SpectralDense, centered_softplus, lcnn_model_kwargs)
from lcnn_jax.nn.models import (MLP, MODE_ARGUMENTS, MODELS, VGG11, BasicBlock, LeNet, MSLeNet, ResNet, ResNet18,
                                SmallCNN, is_builtin_model, make_lcnn_model, make_model, mode_kwargs, model_keywords, register_model,
                                registered_models, resolve_model)

__all__ = ["conv", "ACTIVATIONS", "NORMS", "POOLS", "Activation", "BatchNorm", "Conv", "Dense", "Identity", "ModuleFactory",
           "activation", "normalization", "pool2d", "resolve_activation", "resolve_norm", "softplus_beta", "MLP",
           "MODELS", "VGG11", "BasicBlock", "LeNet", "MSLeNet", "ResNet", "ResNet18", "SmallCNN", "make_model",
           "register_model", "registered_models", "resolve_model", "model_keywords", "is_builtin_model", "mode_kwargs",
           "MODE_ARGUMENTS",
           "LCNN_LAYERS", "CenteredSoftplus", "LCNNBasicBlock", "LipschitzBatchNorm", "SpectralConv", "SpectralDense",
           "centered_softplus", "lcnn_model_kwargs", "make_lcnn_model"]
