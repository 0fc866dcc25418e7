"""Product search: `ProductIndex` on FAISS and `MilvusProductIndex` on Milvus, with the same methods."""
