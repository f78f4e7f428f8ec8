"""Reading inputs: listing sources into sorted input references and cutting them into
shards (listing), opening each input (readers: files, URLs, tars, HF datasets) and
fetching URLs with timeouts and retries (http_fetch)."""
