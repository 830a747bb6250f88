using System.Diagnostics;
using System.Globalization;

namespace Distributed.Cluster;

/// <summary>
/// GPU utilisation and memory where a GPU is used, read from `nvidia-smi` (NVML's command line, present wherever the
/// driver is) every few seconds on a thread-pool timer, never on the training thread. Reports the first visible device.
/// </summary>
public sealed class GpuSampler : IDisposable
{
    public const string Query = "--query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits";

    readonly Timer _timer;
    int _running;

    GpuSampler(TimeSpan interval) => _timer = new Timer(_ => Sample(), null, TimeSpan.Zero, interval);

    /// <summary>Latest reading: utilisation 0..1 and memory in bytes; null until one succeeded.</summary>
    public (double Utilisation, long MemoryBytes)? Latest { get; private set; }

    /// <summary>A sampler when this process uses a GPU and nvidia-smi is on the PATH; null otherwise.</summary>
    public static GpuSampler? Start(bool gpuUsed, TimeSpan interval) =>
        gpuUsed && FindOnPath("nvidia-smi") ? new GpuSampler(interval) : null;

    /// <summary>Parses nvidia-smi's answer to <see cref="Query"/> ("87, 1234": percent, MiB), first line.</summary>
    public static (double Utilisation, long MemoryBytes)? Parse(string output)
    {
        var line = output.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries).FirstOrDefault();
        var parts = line?.Split(',', StringSplitOptions.TrimEntries);
        if (parts is not [var util, var memory, ..] ||
            !double.TryParse(util, NumberStyles.Float, CultureInfo.InvariantCulture, out double percent) ||
            !double.TryParse(memory, NumberStyles.Float, CultureInfo.InvariantCulture, out double mib))
            return null;
        return (percent / 100, (long)(mib * 1024 * 1024));
    }

    void Sample()
    {
        if (Interlocked.Exchange(ref _running, 1) == 1) return;
        try
        {
            var info = new ProcessStartInfo("nvidia-smi", Query) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            using var process = Process.Start(info);
            if (process is null) return;
            string output = process.StandardOutput.ReadToEnd();
            if (process.WaitForExit(5000) && process.ExitCode == 0 && Parse(output) is { } reading) Latest = reading;
        }
        catch (Exception e) when (e is System.ComponentModel.Win32Exception or InvalidOperationException) { }
        finally { Interlocked.Exchange(ref _running, 0); }
    }

    static bool FindOnPath(string program) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries).Any(d => File.Exists(Path.Combine(d, program)));

    public void Dispose() => _timer.Dispose();
}
