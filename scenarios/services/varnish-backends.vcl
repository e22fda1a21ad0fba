vcl 4.1;
# Varnish in front of a backend group (scenarios/varnish-backends.yaml): the harness renders this into each
# Varnish host's folder, writing each line that names {backend.*} once per backend host, with the address to
# use (the fault proxy's, when a network fault can act between the groups). Items are cached for a second,
# so most requests of a large key space go to the backends. A backend that does not answer within a second
# (the client waits two) is a 503.
import directors;

backend {backend.name} { .host = "{backend.addr}"; .port = "{backend.port}"; .connect_timeout = 500ms; .first_byte_timeout = 1s; .between_bytes_timeout = 1s; }

sub vcl_init {
    new cluster = directors.round_robin();
    cluster.add_backend({backend.name});
}

sub vcl_recv {
    if (req.url == "/health") {
        return (synth(200, "OK"));
    }
    set req.backend_hint = cluster.backend();
}

sub vcl_backend_response {
    set beresp.ttl = 1s;
    set beresp.grace = 0s;
}
