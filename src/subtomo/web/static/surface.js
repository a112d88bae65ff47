// A minimal WebGL viewer for the server's marching-cubes mesh ("SMSH" blob): drag to rotate.
"use strict";

class SurfaceView {
  constructor(canvas) {
    this.canvas = canvas;
    this.gl = canvas.getContext("webgl", {preserveDrawingBuffer: true});
    this.rotX = -0.5; this.rotY = 0.6; this.count = 0;
    if (!this.gl) { canvas.replaceWith(el("p", {class: "muted"}, "WebGL is not available in this browser.")); return; }
    const gl = this.gl;
    const vs = "attribute vec3 p; attribute vec3 n; uniform mat3 r; varying vec3 vn;" +
               "void main(){ vec3 q = r * p; vn = r * n; gl_Position = vec4(q.xy * 0.9, -q.z * 0.5, 1.0); }";
    const fs = "precision mediump float; varying vec3 vn;" +
               "void main(){ vec3 l = normalize(vec3(0.4, 0.5, 1.0)); float d = abs(dot(normalize(vn), l));" +
               " gl_FragColor = vec4(vec3(0.25, 0.55, 0.85) * (0.25 + 0.75 * d), 1.0); }";
    const program = gl.createProgram();
    for (const [type, src] of [[gl.VERTEX_SHADER, vs], [gl.FRAGMENT_SHADER, fs]]) {
      const s = gl.createShader(type); gl.shaderSource(s, src); gl.compileShader(s); gl.attachShader(program, s);
    }
    gl.linkProgram(program); gl.useProgram(program);
    this.program = program;
    this.ext = gl.getExtension("OES_element_index_uint");
    this.buffers = {p: gl.createBuffer(), n: gl.createBuffer(), f: gl.createBuffer()};
    gl.enable(gl.DEPTH_TEST);
    let drag = null;
    canvas.onmousedown = e => { drag = [e.clientX, e.clientY]; };
    window.addEventListener("mouseup", () => { drag = null; });
    canvas.onmousemove = e => {
      if (!drag) return;
      this.rotY += (e.clientX - drag[0]) * 0.01; this.rotX += (e.clientY - drag[1]) * 0.01;
      drag = [e.clientX, e.clientY]; this.draw();
    };
  }

  setMesh(buffer) {
    const header = new DataView(buffer, 0, 12);
    const nv = header.getUint32(4, true), nf = header.getUint32(8, true);
    if (!this.gl) return nf;  // no WebGL: the mesh is computed but cannot be drawn
    const gl = this.gl;
    const verts = new Float32Array(buffer, 12, nv * 3);
    const normals = new Float32Array(buffer, 12 + nv * 12, nv * 3);
    const faces = new Uint32Array(buffer, 12 + nv * 24, nf * 3);
    gl.bindBuffer(gl.ARRAY_BUFFER, this.buffers.p); gl.bufferData(gl.ARRAY_BUFFER, verts, gl.STATIC_DRAW);
    gl.bindBuffer(gl.ARRAY_BUFFER, this.buffers.n); gl.bufferData(gl.ARRAY_BUFFER, normals, gl.STATIC_DRAW);
    gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, this.buffers.f); gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, faces, gl.STATIC_DRAW);
    this.count = nf * 3;
    this.draw();
    return nf;
  }

  draw() {
    const gl = this.gl;
    const cx = Math.cos(this.rotX), sx = Math.sin(this.rotX), cy = Math.cos(this.rotY), sy = Math.sin(this.rotY);
    // column-major rotation: about y, then about x
    const r = new Float32Array([cy, sx * sy, -cx * sy, 0, cx, sx, sy, -sx * cy, cx * cy]);
    gl.viewport(0, 0, this.canvas.width, this.canvas.height);
    gl.clearColor(1, 1, 1, 1); gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
    if (!this.count) return;
    gl.uniformMatrix3fv(gl.getUniformLocation(this.program, "r"), false, r);
    for (const [name, buffer] of [["p", this.buffers.p], ["n", this.buffers.n]]) {
      const loc = gl.getAttribLocation(this.program, name);
      gl.bindBuffer(gl.ARRAY_BUFFER, buffer); gl.enableVertexAttribArray(loc);
      gl.vertexAttribPointer(loc, 3, gl.FLOAT, false, 0, 0);
    }
    gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, this.buffers.f);
    gl.drawElements(gl.TRIANGLES, this.count, gl.UNSIGNED_INT, 0);
  }
}
