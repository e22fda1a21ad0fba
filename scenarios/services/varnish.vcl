vcl 4.1;
# Varnish answering from VCL (no backend): rendered into each host's folder and loaded at start.
backend default none;

sub vcl_recv {
    if (req.url == "/health") {
        return (synth(200, "OK"));
    }
    if (req.url ~ "^/item/") {
        return (synth(200, "OK"));
    }
    return (synth(404, "Not Found"));
}

sub vcl_synth {
    set resp.http.Content-Type = "text/plain";
    set resp.body = "item " + req.url;
    return (deliver);
}
