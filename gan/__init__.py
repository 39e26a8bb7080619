"""The plumbing around the two notebooks, one room per job. `gan_utils.py`, beside this package, is
the notebooks' first helper (pixels, minibatches, logging, image grids).

* `vanilla_gan`: the method (networks, losses, EMA, one training step), exported from Vanilla_GAN.ipynb
* `dcgan`: DCGAN.ipynb's convolutional networks, exported from it
* `settings`: every notebook parameter, what it may be, and every check of the settings
* `runs`: run directories, locks, signals, checkpoints, rolling back, the files a run writes
* `mnist_data`, `image_data`: the data (MNIST; CIFAR-10 and folders of images)
* `metrics`: Parzen, FD, KID, precision/recall, classifier score (on the reference classifiers)
* `inception`: Inception FID and KID in published units (the TF Inception network)
* `mnist_classifier`, `cifar_classifier`: the reference classifiers behind the metrics
* `plots`: the figures after training
* `hardware`: choices by the hardware (device, matmul precision, kernels) and the CUDA-graph step
* `errors`: the errors a run can stop with
"""
