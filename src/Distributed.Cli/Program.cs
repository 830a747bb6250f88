using static TorchSharp.torch;
var t = ones(3) * 2;
Console.WriteLine(t.sum().item<float>());
