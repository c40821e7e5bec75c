def unavailable_reason():
    return "the C++/CUDA extension is not written yet"
