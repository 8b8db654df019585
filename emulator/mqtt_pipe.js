// The TLS MQTT port's byte pipe (nginx stream module + njs): nginx terminates TLS and proxies
// the connection to the emulator's internal HTTP listener, where the device sessions live.
// This filter puts one upgrade request in front of the device's first bytes and drops the
// listener's "101 Switching Protocols" answer, so after it both sides see only MQTT.
// (emulator/mqtt_transport.lua serve_raw answers the upgrade.)
function pipe(s) {
    var upgraded = false, answer = '';
    s.on('upload', function (data, flags) {
        if (!upgraded) {
            upgraded = true;
            s.send('GET /_emulator/mqtt-raw HTTP/1.1\r\nHost: mqtt\r\nUpgrade: iothub-mqtt\r\n' +
                   'Connection: Upgrade\r\nX-Device-Address: ' + s.remoteAddress + '\r\n\r\n', flags);
        }
        s.send(data, flags);
    });
    var through = false;
    s.on('download', function (data, flags) {
        if (through) { s.send(data, flags); return; }
        answer += data;
        var end = answer.indexOf('\r\n\r\n');
        if (end < 0) {
            if (answer.length > 4096) { s.error('mqtt pipe: no upgrade answer'); s.done(); }
            return;
        }
        through = true;
        var rest = answer.substring(end + 4);
        answer = '';
        if (rest.length > 0 || flags.last) s.send(rest, flags);
    });
}

export default { pipe };
