"""Models: the latent autoencoder, the conditioned denoiser, the mask model and saved bundles."""
