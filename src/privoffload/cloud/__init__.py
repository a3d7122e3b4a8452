"""The cloud: an Open Inference Protocol v2 service for the classifier, with a versioned model repository.

The cloud knows only the classifier. Nothing in this package imports the client or anything about
the obfuscator: what it receives is an image, obfuscated or not, and it cannot tell which.
"""
