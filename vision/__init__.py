"""What training and inference share: decoding, preprocessing, model files and Grad-CAM.

`decode` and `preprocess` need only NumPy and Pillow; `modelio` and `gradcam` import
TensorFlow, so a process that will fork must not import them.
"""
